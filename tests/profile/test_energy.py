"""Energy estimate: the table arithmetic and the dtype rows."""

import pytest
import torch

from compactml.profile.energy import estimate_energy, mac_kind


def test_energy_is_macs_times_mac_energy_plus_bytes_times_access_energy():
    energy = estimate_energy(
        {"fp32": 1000, "int8": 1000},
        weight_bytes=400,
        input_bytes=100,
        activation_bytes=200,
        memory="dram",
    )
    # 1000 * (3.7 + 0.9) + 1000 * (0.2 + 0.03) = 4830 pJ
    assert energy.compute_uj == pytest.approx(4830e-6)
    # (400 + 100 + 2 * 200) bytes = 225 32-bit accesses * 640 pJ = 144,000 pJ
    assert energy.memory_uj == pytest.approx(0.144)
    assert energy.total_uj == pytest.approx(0.144 + 4830e-6)
    assert energy.to_dict()["estimate"] is True
    assert "DRAM" in energy.table and "Horowitz" in energy.table


def test_sram_is_cheaper_than_dram():
    sram = estimate_energy({"fp32": 0}, 400, 0, 0, "sram")
    dram = estimate_energy({"fp32": 0}, 400, 0, 0, "dram")
    assert sram.memory_uj == pytest.approx(100 * 5e-6)
    assert dram.memory_uj == pytest.approx(100 * 640e-6)


def test_mac_row_follows_the_weight_dtype():
    assert mac_kind(torch.float32) == "fp32"
    assert mac_kind(torch.bfloat16) == "fp16"
    assert mac_kind(torch.int8) == "int8"
    assert mac_kind(torch.uint8) == "int8"
    with pytest.raises(ValueError):
        estimate_energy({"fp32": 1}, 0, 0, 0, "tape")
