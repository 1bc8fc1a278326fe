"""WeightOnly and Half configs, the quantize() verb, and the TECHNIQUES table."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from compactml.config import Technique, history, matches
from compactml.errors import CompactMLError
from compactml.quantize import Half, WeightOnly, quantize
from compactml.quantize.affine import PerChannel, PerGroup, QScheme
from compactml.quantize.modules import QuantConv2d, QuantEmbedding, QuantLinear
from compactml.techniques import TECHNIQUES, technique_from_dict, technique_name


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_input_model_is_untouched_and_layers_replaced(factory):
    model = factory("tokens")
    before = snapshot(model)
    types = [type(m) for m in model.modules()]
    ids = torch.randint(0, 100, (4, 6))
    with pytest.warns(UserWarning, match=r"kept 1 layer\(s\) in float: out: group size 32"):
        quantized = quantize(model, WeightOnly(bits=4, group_size=32))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == types
    assert isinstance(quantized.embed, QuantEmbedding)
    assert isinstance(quantized.proj, QuantLinear) and isinstance(quantized.head, QuantLinear)
    assert type(quantized.out) is nn.Linear  # 48 is not a multiple of 32: kept in float
    assert quantized.proj.scheme == QScheme(4, True, PerGroup(32))
    rel = (quantized(ids) - model(ids)).norm() / model(ids).norm()
    assert 0 < rel < 0.2
    (entry,) = history(quantized)
    assert entry["technique"] == "WeightOnly" and entry["changed"] == ["embed", "proj", "head"]
    assert list(entry["skipped"]) == ["out"] and "row length 48" in entry["skipped"]["out"]
    assert history(model) == []


def test_excluded_layers_stay_float(factory):
    model = factory("conv")
    config = WeightOnly(bits=8, group_size=None, exclude=("conv1", "fc"))
    quantized = quantize(model, config)
    assert type(quantized.conv1) is nn.Conv2d and type(quantized.fc) is nn.Linear
    assert isinstance(quantized.conv2, QuantConv2d) and isinstance(quantized.conv3, QuantConv2d)
    assert quantized.conv3.padding_mode == "reflect" and quantized.conv3.groups == 2
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(quantized(x), model(x), atol=0.02)


def test_include_patterns_select_by_prefix(factory):
    quantized = quantize(factory("wide"), Half(include=("0", "4")))
    replaced = [n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)]
    assert replaced == ["0", "4"]
    assert matches("encoder.layer.0.attn", ("encoder",))
    assert matches("encoder.layer.0.attn", ("*.attn",))
    assert not matches("decoder.attn", ("encoder",))


def test_mse_clip_lowers_output_error(factory):
    model = factory("wide")
    x = torch.randn(16, 256)
    errors = {}
    for clip in ("none", "mse"):
        out = WeightOnly(bits=3, group_size=64, clip=clip).apply(model)(x)
        errors[clip] = (out - model(x)).norm().item()
    assert errors["mse"] < errors["none"]


def test_group_size_dividing_no_layer_is_an_error(factory):
    model = nn.Sequential(nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(CompactMLError, match=r"no selected layer can be quantized; 0: group"):
        quantize(model, WeightOnly(bits=4, group_size=32))


def test_patterns_selecting_nothing_are_an_error(factory):
    with pytest.raises(CompactMLError, match="found no Linear, Conv2d or Embedding"):
        quantize(factory("wide"), WeightOnly(include=("encoder.*",)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 1}, "from 2 to 8"),
        ({"bits": 9}, "from 2 to 8"),
        ({"group_size": 48}, "group_size=48 is not supported; use one of 16, 32"),
        ({"clip": "max"}, "clip='max' is not supported"),
        ({"symmetric": "yes"}, "symmetric must be true or false"),
        ({"include": 3}, "include must be a list"),
    ],
)
def test_bad_weight_only_configs(kwargs, message):
    with pytest.raises(CompactMLError, match=message):
        WeightOnly(**kwargs)


def test_configs_are_frozen_and_validate():
    config = WeightOnly(bits=8, group_size=None, include=["a", "b"])
    assert config.include == ("a", "b")
    assert config.scheme() == QScheme(8, True, PerChannel(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.bits = 4
    with pytest.raises(CompactMLError, match="float16, bfloat16"):
        Half(dtype="float8")
    with pytest.raises(TypeError):
        Technique()  # abstract: apply is missing


def test_half_halves_weights_and_keeps_outputs(factory):
    model = factory("conv")
    x = torch.randn(2, 1, 8, 8)
    for dtype, tol in (("float16", 1e-3), ("bfloat16", 2e-2)):
        half = quantize(model, Half(dtype=dtype))
        assert half.conv1.qweight.dtype == getattr(torch, dtype)
        assert torch.allclose(half(x), model(x), atol=tol)
        assert half(x).dtype == torch.float32


def test_quantize_refuses_other_families():
    @dataclasses.dataclass(frozen=True)
    class Prune(Technique):
        family = "prune"

        def apply(self, model, task=None):
            return model

    with pytest.raises(CompactMLError, match="got a prune technique"):
        quantize(nn.Linear(4, 4), Prune())
    with pytest.raises(CompactMLError, match="pass a quantization config"):
        quantize(nn.Linear(4, 4), {"bits": 4})


def test_single_layer_model():
    layer = nn.Linear(32, 4)
    quantized = quantize(layer, WeightOnly(bits=8, group_size=32))
    assert isinstance(quantized, QuantLinear)
    assert type(layer) is nn.Linear


def test_technique_table():
    assert TECHNIQUES["weight_only"] is WeightOnly and TECHNIQUES["half"] is Half
    config = technique_from_dict("weight_only", {"bits": 4, "group_size": 64, "clip": "mse"})
    assert config == WeightOnly(bits=4, group_size=64, clip="mse")
    assert technique_from_dict("half", {"exclude": ["fc"]}) == Half(exclude=("fc",))
    assert technique_name(config) == "weight_only"
    with pytest.raises(CompactMLError, match="unknown technique 'int4'; use one of .*weight_only"):
        technique_from_dict("int4", {})
    with pytest.raises(CompactMLError, match="unknown parameter.* groupsize for weight_only; val"):
        technique_from_dict("weight_only", {"groupsize": 32})
    with pytest.raises(CompactMLError, match="from 2 to 8"):
        technique_from_dict("weight_only", {"bits": 12})
