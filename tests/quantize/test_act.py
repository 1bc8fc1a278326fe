"""ActQuant: ONNX QuantizeLinear/DequantizeLinear math, LSQ gradients, freezing, and the
``input_quant`` child of the quantized layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.quantize.act import ActQuant, act_qparams, code_range
from compactml.quantize.affine import PerChannel, QScheme
from compactml.quantize.modules import QuantConv2d, QuantLinear


def test_fake_quant_matches_hand_computed_values():
    quant = ActQuant(bits=8, signed=False, scale=0.5, zero_point=3)
    x = torch.tensor([-2.0, -0.25, 0.25, 0.75, 1.25, 200.0])
    # x / s = -4, -0.5, 0.5, 1.5, 2.5, 400 -> half to even -4, -0, 0, 2, 2, 400; + 3; clamp 0..255
    assert quant.quantize(x).tolist() == [0, 3, 3, 5, 5, 255]
    assert quant(x).tolist() == [-1.5, 0.0, 0.0, 1.0, 1.0, 126.0]


def test_zero_point_is_added_after_rounding():
    # round(2.5) + 3 = 5 (ONNX); round(2.5 + 3) would give 6.
    quant = ActQuant(bits=8, scale=1.0, zero_point=3)
    assert quant.quantize(torch.tensor([2.5])).tolist() == [5]


def test_signed_codes_cover_int8():
    quant = ActQuant(bits=8, signed=True, scale=0.1, zero_point=0)
    assert (quant.qmin, quant.qmax) == (-128, 127)
    out = quant(torch.tensor([-100.0, -0.05, 0.15, 100.0]))
    assert torch.allclose(out, torch.tensor([-12.8, 0.0, 0.2, 12.7]))
    assert code_range(4, False) == (0, 15) and code_range(4, True) == (-8, 7)


@pytest.mark.parametrize(("signed", "zero_point"), [(False, 37), (True, -5)])
def test_matches_onnxruntime_quantize_dequantize(signed, zero_point):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    dtype = np.int8 if signed else np.uint8
    onnx_type = TensorProto.INT8 if signed else TensorProto.UINT8
    scale = 0.0371
    inits = [
        helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("z", onnx_type, [], [zero_point]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [
            helper.make_tensor_value_info("q", onnx_type, [None]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [None]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    quant = ActQuant(bits=8, signed=signed, scale=scale, zero_point=zero_point)
    s = float(quant.scale)
    halves = (torch.arange(-40, 40, dtype=torch.float32) + 0.5) * s  # exact ties
    x = torch.cat([torch.randn(5000) * 4, halves])
    q, y = session.run(None, {"x": x.numpy()})
    assert q.dtype == dtype
    assert np.array_equal(quant.quantize(x).numpy(), q.astype(np.int32))
    assert np.array_equal(quant(x).numpy(), y)


def test_straight_through_gradient_to_the_input():
    quant = ActQuant(bits=8, scale=0.1, zero_point=0)
    x = torch.tensor([-1.0, 0.33, 5.0, 30.0], requires_grad=True)
    quant(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # clipped below 0 and above 25.5


def test_learned_scale_gets_the_lsq_gradient():
    s, zp = 0.1, 10
    quant = ActQuant(bits=4, scale=s, zero_point=zp, learn=True)
    assert isinstance(quant.scale, nn.Parameter)
    x = torch.tensor([[0.33, -2.0, 0.44, 5.0]])  # one sample of 4 features
    quant(x).sum().backward()
    v = x[0] / torch.tensor(s)
    # LSQ: round(v) - v inside the range, qmin - zp below it, qmax - zp above it.
    per_element = [float(torch.round(v[0]) - v[0]), 0 - zp, float(torch.round(v[2]) - v[2]), 5]
    g = 1.0 / math.sqrt(4 * (15 - zp))
    assert quant.scale.grad.item() == pytest.approx(sum(per_element) * g, rel=1e-5)


def test_freeze_makes_the_scale_a_buffer_with_the_same_outputs():
    quant = ActQuant(bits=8, scale=0.05, zero_point=2, learn=True)
    with torch.no_grad():
        quant.scale.fill_(0.0423)
    x = torch.randn(3, 7)
    before = quant(x)
    quant.freeze()
    assert not quant.learn and "scale" in dict(quant.named_buffers())
    assert list(quant.parameters()) == []
    assert quant.scale.dtype == torch.float32 and quant.zero_point.dtype == torch.int32
    assert torch.equal(quant(x), before)
    assert set(quant.state_dict()) == {"scale", "zero_point"}


def test_act_qparams_cover_the_range_with_zero_exact():
    scale, zp = act_qparams(0.0, 2.55)
    assert scale == pytest.approx(0.01) and zp == 0
    scale, zp = act_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zp == 64  # round(63.75)
    scale, zp = act_qparams(0.5, 2.0)  # widened to [0, 2]
    assert zp == 0 and scale == pytest.approx(2 / 255)
    quant = ActQuant(8, False, *act_qparams(-1.0, 3.0))
    assert quant(torch.tensor([0.0])).item() == 0.0
    assert act_qparams(0.0, 0.0) == (1.0, 0)


@pytest.mark.parametrize(
    "kwargs",
    [{"bits": 1}, {"bits": True}, {"zero_point": 256}, {"scale": 0.0}, {"scale": float("nan")}],
)
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(CompactMLError):
        ActQuant(**kwargs)
    with pytest.raises(CompactMLError, match="not finite"):
        act_qparams(0.0, float("inf"))


def _layers() -> list[nn.Module]:
    scheme = QScheme(4, True, PerChannel(0))
    torch.manual_seed(0)
    return [
        QuantLinear.from_float(nn.Linear(6, 3), scheme),
        QuantConv2d.from_float(nn.Conv2d(2, 4, 3, padding=1), scheme),
    ]


@pytest.mark.parametrize("index", [0, 1])
def test_quant_layer_applies_and_describes_its_input_quant(index):
    layer = _layers()[index]
    assert layer.input_quant is None and "input_quant" not in layer.compactml_spec()
    x = torch.randn(2, 6) if index == 0 else torch.randn(2, 2, 5, 5)
    plain = layer(x)
    layer.input_quant = ActQuant(bits=8, signed=True, scale=0.25, zero_point=1)
    quantized = layer(x)
    layer.input_quant = None
    assert torch.equal(layer(ActQuant(8, True, 0.25, 1)(x)), quantized)
    assert not torch.equal(plain, quantized)
    layer.input_quant = ActQuant(bits=8, signed=True, scale=0.25, zero_point=1)
    spec = layer.compactml_spec()
    assert spec["input_quant"] == {"bits": 8, "signed": True}
    rebuilt = type(layer).from_compactml_spec(spec)
    assert isinstance(rebuilt.input_quant, ActQuant) and rebuilt.input_quant.signed
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt(x), quantized)
    assert rebuilt.compactml_spec() == spec
