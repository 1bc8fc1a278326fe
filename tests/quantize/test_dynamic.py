"""Dynamic INT8: per-token activation math, the DynamicQuantLinear layer, and the Dynamic config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactml.config import history
from compactml.errors import CompactMLError
from compactml.export.artifact import load, save
from compactml.quantize import Dynamic, DynamicQuantLinear, WeightOnly, quantize
from compactml.quantize.dynamic import (
    WEIGHT_SCHEME,
    fake_quantize_tensor,
    fake_quantize_tokens,
    quantize_tensor,
    quantize_tokens,
)
from compactml.techniques import technique_from_dict, technique_name


def test_token_codes_match_hand_computed_values():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.5, -0.75, 0.0]])
    codes, scale = quantize_tokens(x)
    # Row 0: amax 2, x * 63.5 = 63.5, -127, 31.75, 0 -> round half to even 64, -127, 32, 0.
    assert codes[0].tolist() == [192, 1, 160, 128]
    assert codes[1].tolist() == [128] * 4  # an all-zero token: exact zeros, finite scale
    assert codes[2].tolist() == [255, 192, 96, 128]  # 3 * 127/3, 1.5 * 42.33 = 63.5 -> 64
    assert scale.shape == (3, 1) and torch.isfinite(scale).all()
    assert scale[0, 0] == pytest.approx(2.0 / 127) and scale[2, 0] == pytest.approx(3.0 / 127)
    assert codes.dtype == torch.uint8


def test_token_round_trip_error_is_at_most_half_a_step_per_token():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 96) * torch.rand(4, 7, 1) * 10
    err = (fake_quantize_tokens(x) - x).abs()
    step = x.abs().amax(-1, keepdim=True) / 127
    assert (err <= step / 2 + 1e-6).all()
    assert err.amax() > 0  # it does quantize


def test_tensor_codes_match_hand_computed_values():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.1, -0.75]])
    codes, scale, zero = quantize_tensor(x)
    # range [-2, 3.1] -> scale 5.1 / 255 = 0.02; zero point round(2 / 0.02) = 100
    assert scale.item() == pytest.approx(5.1 / 255) and zero.item() == 100
    assert codes.tolist() == [[150, 0, 125], [100, 255, 62]]  # -0.75 / 0.02 = -37.5 -> -38
    positive = quantize_tensor(torch.tensor([0.25, 1.0]))  # 0 always in range: zero point 0
    assert positive[2].item() == 0 and positive[0].tolist() == [64, 255]
    empty = quantize_tensor(torch.zeros(2, 3))  # all zeros: scale 1, codes 0
    assert empty[1].item() == 1.0 and empty[2].item() == 0 and not empty[0].any()
    torch.manual_seed(0)
    y = torch.randn(4, 7, 96) * 5 + 1
    err = (fake_quantize_tensor(y) - y).abs()
    assert err.max() <= quantize_tensor(y)[1] / 2 + 1e-6 and err.max() > 0


def make_layer(bias: bool = True) -> tuple[nn.Linear, DynamicQuantLinear]:
    torch.manual_seed(1)
    lin = nn.Linear(48, 24, bias=bias)
    return lin, DynamicQuantLinear.from_float(lin)


def test_layer_computes_quantized_tokens_times_dequantized_weight():
    lin, layer = make_layer()
    x = torch.randn(2, 5, 48)
    codes, scale = quantize_tokens(x)
    w = layer.qweight_data()
    assert w.scheme == WEIGHT_SCHEME and w.codes().shape == (24, 48)
    w_codes = w.codes().float() - 128
    expected = ((codes.float() - 128) @ w_codes.T) * scale * w.scale.float() + lin.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    rel = (layer(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert 0 < rel < 0.02  # close to the float layer, but quantized


def test_all_zero_token_gives_the_bias_and_float16_inputs_stay_float16():
    lin, layer = make_layer()
    x = torch.zeros(3, 48)
    assert torch.equal(layer(x), lin.bias.detach().expand(3, 24))
    assert layer(torch.randn(2, 48).half()).dtype == torch.float16
    with pytest.raises(CompactMLError, match="float input"):
        layer(torch.ones(2, 48, dtype=torch.long))


def test_layer_storage_is_int8_codes_fp16_scales_and_bias():
    _, layer = make_layer()
    assert layer.storage_bytes() == 24 * 48 + 24 * 2 + 24 * 4
    assert layer.qweight.dtype == torch.uint8 and layer.scale.dtype == torch.float16
    _, no_bias = make_layer(bias=False)
    assert no_bias.bias is None and no_bias.storage_bytes() == 24 * 48 + 24 * 2
    assert "per-token dynamic" in repr(layer) and "int8 sym per-channel" in repr(layer)


def test_layer_refuses_other_weight_schemes():
    with pytest.raises(CompactMLError, match="int8 symmetric per-channel"):
        DynamicQuantLinear(8, 4, True, WeightOnly(bits=4, group_size=None).scheme())


def test_config_validates_bits():
    for bits in (4, 16, True):
        with pytest.raises(CompactMLError, match="Dynamic supports 8 bits only"):
            Dynamic(bits=bits)
    assert Dynamic().bits == 8
    assert technique_from_dict("dynamic", {"bits": 8}) == Dynamic()
    assert technique_name(Dynamic()) == "dynamic"
    with pytest.raises(CompactMLError, match="unknown parameter"):
        technique_from_dict("dynamic", {"per_token": True})
    assert Dynamic(per_tensor="*.q").per_tensor == ("*.q",)
    with pytest.raises(CompactMLError, match="per_tensor must be a list of module-name"):
        Dynamic(per_tensor=3)
    with pytest.raises(CompactMLError, match="activation must be one of"):
        DynamicQuantLinear(8, 4, True, activation="channel")


def test_dynamic_replaces_selected_linears_and_leaves_the_input_alone(factory):
    model = factory("tokens")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize(model, Dynamic(exclude=("out",)))
    assert isinstance(q.proj, DynamicQuantLinear) and isinstance(q.head, DynamicQuantLinear)
    assert type(q.out) is nn.Linear and type(q.embed) is nn.Embedding
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.proj) is nn.Linear
    entry = history(q)[-1]
    assert entry["technique"] == "Dynamic" and entry["changed"] == ["proj", "head"]
    assert entry["params"]["bits"] == 8 and entry["family"] == "quantize"
    ids = torch.randint(0, 100, (3, 6))
    ref = model(ids)
    assert (q(ids) - ref).abs().max() / ref.abs().max() < 0.05


def test_dynamic_on_a_single_layer_and_with_nothing_selected():
    lin = nn.Linear(16, 8)
    assert isinstance(quantize(lin, Dynamic()), DynamicQuantLinear)
    with pytest.raises(CompactMLError, match="found no Linear layer"):
        quantize(nn.Sequential(nn.Linear(4, 4)), Dynamic(include=("nothing",)))


@pytest.mark.parametrize("per_tensor", [(), ("head",)])
def test_cml_round_trip_is_bit_exact(factory, tmp_path, per_tensor):
    q = quantize(factory("tokens"), Dynamic(per_tensor=per_tensor))
    assert q.head.activation == ("tensor" if per_tensor else "token")
    loaded = load(save(q, tmp_path / "d.cml"), trust_factory=True)
    assert isinstance(loaded.proj, DynamicQuantLinear) and repr(loaded) == repr(q)
    assert loaded.head.activation == q.head.activation and loaded.proj.activation == "token"
    a, b = q.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 100, (2, 9))
    assert torch.equal(loaded(ids), q(ids))
    assert history(loaded) == history(q)
