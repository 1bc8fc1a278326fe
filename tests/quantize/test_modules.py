"""QWeight and the quantized layers: exact outputs against the dequantized weight, storage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compactml.errors import CompactMLError
from compactml.quantize.affine import FloatScheme, PerChannel, PerGroup, PerTensor, QScheme
from compactml.quantize.modules import QuantConv2d, QuantEmbedding, QuantLinear
from compactml.quantize.qweight import QWeight

SCHEMES = [
    QScheme(4, True, PerGroup(32)),
    QScheme(2, False, PerGroup(16)),
    QScheme(8, True, PerChannel(0)),
    QScheme(3, False, PerTensor()),
    FloatScheme("float16"),
    FloatScheme("bfloat16"),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_qweight_storage_bytes_and_dequantize(scheme):
    w = torch.randn(24, 64)
    q = QWeight.from_float(w, scheme)
    if isinstance(scheme, FloatScheme):
        expected = 24 * 64 * 2
        assert torch.equal(q.dequantize(), w.to(scheme.torch_dtype).float())
    else:
        scales = {PerGroup(32): 24 * 2, PerGroup(16): 24 * 4, PerChannel(0): 24, PerTensor(): 1}
        n_scales = scales[scheme.granularity]
        per_byte = {4: 2, 2: 4}.get(scheme.bits, 1)
        expected = 24 * 64 // per_byte + n_scales * 2 + (0 if scheme.symmetric else n_scales)
        assert q.dequantize().dtype == torch.float32
        assert q.codes().shape == w.shape
    assert q.storage_bytes() == expected


def test_int4_group32_is_four_and_a_half_bits_per_weight():
    q = QWeight.from_float(torch.randn(256, 256), QScheme(4, True, PerGroup(32)))
    assert q.bits_per_weight() == 4.5


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_quant_linear_equals_linear_with_dequantized_weight(scheme):
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    layer = QuantLinear.from_float(linear, scheme)
    x = torch.randn(5, 64)
    dq = QWeight.from_float(linear.weight, scheme).dequantize()
    assert torch.equal(layer(x), F.linear(x, dq, linear.bias))
    assert torch.equal(layer.weight, dq)
    assert layer.bias is not linear.bias and torch.equal(layer.bias, linear.bias)
    # Relative output error shrinks with the bit width (float16/bfloat16: 16 bits).
    limit = {2: 0.8, 3: 0.4, 4: 0.2, 8: 0.02, 16: 0.01}[getattr(scheme, "bits", 16)]
    ref = linear(x)
    assert (layer(x) - ref).norm() / ref.norm() < limit


def test_quant_linear_stores_buffers_not_weight_parameters():
    layer = QuantLinear.from_float(nn.Linear(64, 8), QScheme(4, False, PerGroup(32)))
    assert set(layer.state_dict()) == {"qweight", "scale", "zero", "bias"}
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == 8 * 64 // 2
    assert layer.scale.dtype == torch.float16 and layer.zero.dtype == torch.uint8
    assert layer.storage_bytes() == 256 + 16 * 2 + 16 + 8 * 4
    assert "int4 asym g32" in repr(layer)


def test_half_linear_keeps_float32_inputs_and_outputs():
    layer = QuantLinear.from_float(nn.Linear(16, 4), FloatScheme("float16"))
    assert layer.qweight.dtype == torch.float16
    out = layer(torch.randn(3, 16))
    assert out.dtype == torch.float32
    assert "float16" in repr(layer)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stride": 2, "padding": 1},
        {"padding": "same", "dilation": 2, "bias": False},
        {"padding": 1, "padding_mode": "reflect", "groups": 2},
        {"padding": (1, 2), "padding_mode": "circular"},
    ],
)
def test_quant_conv_equals_conv_with_dequantized_weight(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, **kwargs)
    scheme = QScheme(4, True, PerChannel(0))
    layer = QuantConv2d.from_float(conv, scheme)
    reference = nn.Conv2d(8, 16, 3, **kwargs)
    with torch.no_grad():
        reference.weight.copy_(QWeight.from_float(conv.weight, scheme).dequantize())
        if conv.bias is not None:
            reference.bias.copy_(conv.bias)
    x = torch.randn(2, 8, 9, 9)
    assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize(
    "scheme",
    [
        QScheme(4, True, PerGroup(32)),
        QScheme(2, False, PerChannel(0)),
        QScheme(3, True),
        QScheme(4, False, PerTensor()),
        FloatScheme("bfloat16"),
    ],
    ids=lambda s: s.describe(),
)
def test_quant_embedding_lookups_equal_dequantized_rows(scheme):
    torch.manual_seed(0)
    embed = nn.Embedding(50, 64, padding_idx=0)
    layer = QuantEmbedding.from_float(embed, scheme)
    ids = torch.randint(0, 50, (3, 7))
    table = QWeight.from_float(embed.weight, scheme).dequantize()
    out = layer(ids)
    assert out.shape == (3, 7, 64) and out.dtype == torch.float32
    assert torch.equal(out, table[ids])
    assert torch.equal(layer(torch.tensor(4)), table[4])


def test_embedding_with_max_norm_is_refused():
    with pytest.raises(CompactMLError, match="max_norm"):
        QuantEmbedding.from_float(nn.Embedding(10, 32, max_norm=1.0), QScheme(8))


@pytest.mark.parametrize(
    "layer",
    [
        QuantLinear.from_float(nn.Linear(32, 8, bias=False), QScheme(2, False, PerGroup(16))),
        QuantConv2d.from_float(
            nn.Conv2d(4, 8, (3, 1), stride=(2, 1), padding="valid"), FloatScheme("float16")
        ),
        QuantEmbedding.from_float(nn.Embedding(9, 32, padding_idx=3), QScheme(5)),
    ],
    ids=type,
)
def test_spec_rebuilds_an_empty_layer_of_the_same_shapes(layer):
    rebuilt = type(layer).from_compactml_spec(layer.compactml_spec())
    have = {k: (v.shape, v.dtype) for k, v in rebuilt.state_dict().items()}
    assert have == {k: (v.shape, v.dtype) for k, v in layer.state_dict().items()}
    rebuilt.load_state_dict(layer.state_dict())
    assert repr(rebuilt) == repr(layer)
    assert torch.equal(rebuilt.weight, layer.weight)
