"""Quantized models in the .cml artifact: bit-exact round trips and stored sizes."""

from __future__ import annotations

import pytest
import torch

from compactml.config import history
from compactml.export.artifact import artifact_bytes, load, save
from compactml.profile import profile
from compactml.quantize import Half, WeightOnly, quantize
from compactml.quantize.modules import QuantConv2d, QuantEmbedding, QuantLinear

CONFIGS = [
    WeightOnly(bits=4, group_size=32),
    WeightOnly(bits=2, group_size=16, symmetric=False),
    WeightOnly(bits=3, group_size=None, clip="mse"),
    WeightOnly(bits=8, group_size=None, symmetric=False),
    Half(dtype="bfloat16"),
]


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
@pytest.mark.parametrize("net", ["tokens", "conv"])
@pytest.mark.filterwarnings("ignore:.*kept .* in float")
def test_round_trip_is_bit_exact(factory, tmp_path, config, net):
    model = factory(net)
    quantized = quantize(model, config)
    x = torch.randint(0, 100, (3, 5)) if net == "tokens" else torch.randn(2, 1, 8, 8)
    path = save(quantized, tmp_path / "q.cml")
    loaded = load(path, trust_factory=True)
    names = [type(m).__qualname__ for m in quantized.modules()]
    assert [type(m).__qualname__ for m in loaded.modules()] == names
    assert repr(loaded) == repr(quantized)
    assert_same_state(loaded, quantized)
    assert torch.equal(loaded(x), quantized(x))
    assert artifact_bytes(loaded) == artifact_bytes(quantized)


def test_quantized_layers_appear_in_the_loaded_tree(factory, tmp_path):
    with pytest.warns(UserWarning, match="conv1: group size 16 does not divide"):
        quantized = quantize(factory("conv"), WeightOnly(bits=4, group_size=16))
    loaded = load(save(quantized, tmp_path / "q.cml"), trust_factory=True)
    assert isinstance(loaded.conv2, QuantConv2d) and isinstance(loaded.fc, QuantLinear)
    assert type(loaded.conv1) is torch.nn.Conv2d  # 1*3*3 = 9 weights per row: kept float
    tokens = quantize(factory("tokens"), WeightOnly(bits=4, group_size=16))
    loaded = load(save(tokens, tmp_path / "t.cml"), trust_factory=True)
    assert isinstance(loaded.embed, QuantEmbedding) and loaded.embed.padding_idx == 0


def test_history_of_techniques_survives_the_artifact(factory, tmp_path):
    with pytest.warns(UserWarning):
        quantized = quantize(factory("conv"), WeightOnly(bits=4, group_size=16))
    before = history(quantized)
    assert before[0]["technique"] == "WeightOnly" and "conv1" in before[0]["skipped"]
    loaded = load(save(quantized, tmp_path / "q.cml"), trust_factory=True)
    assert history(loaded) == before


def test_int4_group32_artifact_is_at_most_017_of_fp32(factory):
    model = factory("wide")
    fp32 = len(artifact_bytes(model))
    for symmetric in (True, False):
        quantized = quantize(model, WeightOnly(bits=4, group_size=32, symmetric=symmetric))
        ratio = len(artifact_bytes(quantized)) / fp32
        assert ratio <= 0.17, (symmetric, ratio)
        assert ratio >= 0.125  # 4 bits are the floor: the codes really are packed
    exact = sum(m.storage_bytes() for m in quantized.modules() if isinstance(m, QuantLinear))
    assert exact == 4 * (256 * 256 // 2 + 256 * 8 * 3 + 256 * 4)  # codes, fp16+u8 scales, bias


def test_profile_reports_the_smaller_artifact(factory):
    model = factory("wide")
    x = torch.randn(1, 256)
    before = profile(model, x, latency=False).stored_bytes
    after = profile(quantize(model, WeightOnly(bits=4)), x, latency=False).stored_bytes
    half = profile(quantize(model, Half()), x, latency=False).stored_bytes
    assert after <= 0.17 * before
    assert 0.49 * before <= half <= 0.52 * before


def test_half_halves_the_artifact_and_keeps_outputs(factory, tmp_path):
    model = factory("wide")
    half = quantize(model, Half())
    ratio = len(artifact_bytes(half)) / len(artifact_bytes(model))
    assert 0.49 <= ratio <= 0.52
    x = torch.randn(4, 256)
    assert torch.allclose(half(x), model(x), atol=1e-3)
    loaded = load(save(half, tmp_path / "h.cml"), trust_factory=True)
    assert loaded[0].qweight.dtype == torch.float16
    assert torch.equal(loaded(x), half(x))
