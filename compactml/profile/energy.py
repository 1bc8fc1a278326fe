"""Energy per inference, estimated from MAC counts and bytes moved. Always an estimate.

The per-operation energies are the 45 nm, 0.9 V figures of M. Horowitz, "Computing's energy
problem (and what we can do about it)", ISSCC 2014 (the table popularised by Han et al.,
"Learning both weights and connections for efficient neural networks", NeurIPS 2015):

======================  ========  ===========================================
operation               energy    source line
======================  ========  ===========================================
fp32 multiply           3.7 pJ    32-bit float MULT
fp32 add                0.9 pJ    32-bit float ADD
fp16 multiply           1.1 pJ    16-bit float MULT
fp16 add                0.4 pJ    16-bit float ADD
int8 multiply           0.2 pJ    8-bit int MULT
int8 add                0.03 pJ   8-bit int ADD
SRAM read, 32 bits      5 pJ      8 KB cache: 10 pJ per 64-bit read, halved
DRAM access, 32 bits    640 pJ    32-bit DRAM memory access
======================  ========  ===========================================

A MAC costs one multiply plus one add in the dtype of the layer's stored weights (int8 also
stands for int4 and other sub-byte integer weights; bf16 uses the fp16 figures; fp64 uses fp32).
Memory traffic is the weights read once, the input read once, and every activation written
once and read once; a byte costs a quarter of a 32-bit access. On a microcontroller target
(``on_chip``) where the model fits, memory is on-chip SRAM; otherwise it is DRAM. Real chips
differ (process node, caches, flash reads); compare models with it, do not quote it as a
measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Energy of one multiply-accumulate in picojoules (Horowitz 2014, 45 nm): multiply + add.
MAC_PJ = {
    "fp32": 3.7 + 0.9,
    "fp16": 1.1 + 0.4,
    "int8": 0.2 + 0.03,
}

#: Energy of one 32-bit memory access in picojoules (Horowitz 2014, 45 nm).
ACCESS_32BIT_PJ = {
    "sram": 5.0,
    "dram": 640.0,
}

SOURCE = "Horowitz, Computing's energy problem, ISSCC 2014, 45 nm"


@dataclass(frozen=True)
class Energy:
    """Estimated energy of one inference in microjoules, split into compute and memory.

    ``table`` says which figures were used (source, MAC dtypes, memory kind).
    """

    total_uj: float
    compute_uj: float
    memory_uj: float
    table: str
    estimate: bool = True

    def to_dict(self) -> dict:
        """The JSON-able form used by ``Profile.to_dict()["energy"]``."""
        return {
            "total_uj": self.total_uj,
            "compute_uj": self.compute_uj,
            "memory_uj": self.memory_uj,
            "estimate": True,
            "table": self.table,
        }


def mac_kind(dtype: torch.dtype | None) -> str:
    """The row of :data:`MAC_PJ` for weights stored as ``dtype``: fp32, fp16 or int8."""
    if dtype is None or dtype in (torch.float32, torch.float64):
        return "fp32"
    if dtype in (torch.float16, torch.bfloat16):
        return "fp16"
    if not dtype.is_floating_point and not dtype.is_complex:
        return "int8"
    return "fp32"


def estimate_energy(
    macs_by_dtype: dict[str, int],
    weight_bytes: int,
    input_bytes: int,
    activation_bytes: int,
    memory: str,
) -> Energy:
    """Estimate one inference's energy (microjoules) with the table in the module doc.

    Args:
        macs_by_dtype: MAC count per row of :data:`MAC_PJ` (``fp32``, ``fp16``, ``int8``).
        weight_bytes: bytes of weights, read once.
        input_bytes: bytes of the model input, read once.
        activation_bytes: bytes of activations created, each written once and read once.
        memory: ``"sram"`` (on-chip) or ``"dram"``.
    """
    if memory not in ACCESS_32BIT_PJ:
        raise ValueError(f"memory must be one of {sorted(ACCESS_32BIT_PJ)}, got {memory!r}")
    compute_pj = sum(MAC_PJ[kind] * count for kind, count in macs_by_dtype.items())
    moved_bytes = weight_bytes + input_bytes + 2 * activation_bytes
    memory_pj = moved_bytes * ACCESS_32BIT_PJ[memory] / 4.0
    used = sorted(kind for kind, count in macs_by_dtype.items() if count) or ["fp32"]
    macs = ", ".join(f"{kind} MAC {MAC_PJ[kind]:.2f} pJ" for kind in used)
    where = "on-chip SRAM" if memory == "sram" else "DRAM"
    table = f"{SOURCE}: {macs}; memory {where} {ACCESS_32BIT_PJ[memory]:g} pJ per 32-bit access"
    return Energy(
        total_uj=(compute_pj + memory_pj) / 1e6,
        compute_uj=compute_pj / 1e6,
        memory_uj=memory_pj / 1e6,
        table=table,
    )
