"""cml.profile end to end: the report layout, sizes, zeros, fit, inputs and user errors."""

import math
import os

import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.profile import profile

KEYS = {
    "params",
    "nonzero_params",
    "stored_bytes",
    "macs",
    "latency",
    "peak_activation_bytes",
    "peak_activation_note",
    "energy",
    "layers",
    "target",
}


class TinyTextClassifier(nn.Module):
    """Hugging Face style: keyword arguments input_ids and attention_mask, mean-pooled."""

    def __init__(self, vocab: int = 50, dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


LAYER_KEYS = {"name", "type", "params", "nonzero_params", "stored_bytes", "macs", "output_shape"}


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def test_layout_counts_and_layers(conv_linear):
    model = conv_linear
    result = profile(model, torch.randn(1, 3, 16, 16), latency=False).to_dict()
    assert set(result) == KEYS
    assert result["params"] == (8 * 3 * 9 + 8) + (2048 * 10 + 10)
    assert result["macs"] == 8 * 16 * 16 * 27 + 2048 * 10
    assert result["latency"] is None and result["target"] is None
    layers = {layer["name"]: layer for layer in result["layers"]}
    assert set(layers) == {"conv", "fc"}  # the root stores nothing and does no MACs itself
    assert all(set(layer) == LAYER_KEYS for layer in result["layers"])
    assert layers["conv"]["stored_bytes"] == (8 * 3 * 9 + 8) * 4
    assert layers["fc"]["macs"] == 2048 * 10 and layers["fc"]["output_shape"] == [1, 10]
    assert sum(layer["macs"] for layer in result["layers"]) == result["macs"]
    # conv step: input 3*256*4 + conv out 8*256*4 = 11264; relu step (input dead): conv out
    # + relu out = 2 * 8192; the flatten is a view; the fc step: relu out + 10*4.
    assert result["peak_activation_bytes"] == 8192 + 8192
    assert result["energy"]["estimate"] is True and result["energy"]["total_uj"] > 0


def test_stored_bytes_is_the_saved_artifact_size(tmp_path):
    artifact = pytest.importorskip("compactml.export.artifact")
    model = small_cnn()
    size = profile(model, torch.randn(1, 1, 8, 8), latency=False).stored_bytes
    assert size == os.path.getsize(artifact.save(model, tmp_path / "m.cml"))


def test_nonzero_params_counts_zeros():
    model = nn.Linear(10, 4)
    with torch.no_grad():
        model.weight[:2].zero_()  # 20 zeros
        model.bias[0] = 0.0  # 1 zero
    result = profile(model, torch.randn(2, 10), latency=False)
    assert result.params == 44
    assert result.nonzero_params == 44 - 21
    assert result.layers[0].nonzero_params == 44 - 21


def test_latency_is_measured_and_nothing_about_the_model_changes():
    model = small_cnn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    threads = torch.get_num_threads()
    result = profile(model, torch.randn(2, 1, 8, 8), repeats=3, warmup=1, threads=1)
    assert result.latency.threads == 1 and result.latency.repeats == 3
    assert result.latency.median_ms > 0 and result.latency.batch_size == 2
    assert torch.get_num_threads() == threads
    assert all(m.training for m in model.modules())  # modes restored
    for key, value in model.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(value, state[key]), key


def test_fit_on_stm32f746_uses_flash_minus_stored_and_sram_energy():
    model = small_cnn()
    result = profile(model, torch.randn(1, 1, 8, 8), target="stm32f746", latency=False)
    fit = result.to_dict()["target"]
    assert fit["name"] == "stm32f746"
    assert fit["needs_flash_bytes"] == result.stored_bytes
    assert fit["flash_margin_bytes"] == 1024 * 1024 - result.stored_bytes
    assert fit["needs_ram_bytes"] == result.peak_activation_bytes
    assert fit["ram_margin_bytes"] == 320 * 1024 - result.peak_activation_bytes
    assert fit["fits"] is True
    assert "SRAM" in result.energy.table
    assert "DRAM" in profile(model, torch.randn(1, 1, 8, 8), latency=False).energy.table


def test_dict_inputs_are_passed_as_keyword_arguments():
    model = TinyTextClassifier()
    inputs = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6)}
    result = profile(model, inputs, repeats=2, warmup=1)
    assert result.macs == 2 * 8 * 4  # only the head is a matmul: batch 2, 8 -> 4
    assert result.latency.batch_size == 2
    assert result.peak_activation_bytes is not None and result.peak_activation_bytes > 0
    assert result.params == 50 * 8 + 8 * 4 + 4


def test_untraceable_model_still_profiles_with_a_note(untraceable):
    result = profile(untraceable, torch.randn(2, 4), target="stm32f746", latency=False)
    assert result.peak_activation_bytes is None
    assert "cannot trace" in result.peak_activation_note
    # RAM is then checked against every layer output plus the input.
    assert result.target.needs_ram_bytes == 2 * 4 * 4 + 2 * 4 * 4
    assert result.macs == 2 * 4 * 4


def test_unknown_device_is_a_user_error_before_any_measuring():
    model = nn.Linear(2, 2)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(CompactMLError, match="unknown device 'toaster'"):
        profile(model, torch.randn(1, 2), target="toaster")
    assert calls == []


def test_wrong_shaped_input_is_a_user_error():
    with pytest.raises(CompactMLError, match=r"cannot run on the example input tensor\(1, 3\)"):
        profile(nn.Linear(4, 2), torch.randn(1, 3), latency=False)


def test_nan_weight_is_a_user_error():
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(CompactMLError, match="weight weight contains NaN"):
        profile(model, torch.randn(1, 4), latency=False)


def test_tied_weights_count_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.embed(ids))

    result = profile(Tied(), torch.randint(0, 10, (1, 3)), latency=False)
    assert result.params == 40
    assert sum(layer.stored_bytes for layer in result.layers) == 40 * 4
    assert result.macs == 3 * 4 * 10


def test_int8_weights_use_the_int8_mac_energy():
    class Int8Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.randint(-127, 127, (4, 8), dtype=torch.int8))
            self.register_buffer("scale", torch.tensor(0.01))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ (self.weight.float() * self.scale).T

    result = profile(Int8Linear(), torch.randn(2, 8), latency=False)
    assert result.macs == 2 * 4 * 8
    assert result.layers[0].stored_bytes == 4 * 8 * 1 + 4  # int8 weight + float32 scale
    assert result.energy.compute_uj == pytest.approx(64 * (0.2 + 0.03) * 1e-6)
    assert "int8 MAC" in result.energy.table
