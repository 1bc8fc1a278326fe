"""Compressed layers in ONNX: each lowering runs in ONNX Runtime and matches the PyTorch layer.

Tolerances (max abs difference against the PyTorch quantized model, outputs of order 0.1-1):

=====================================  ==========================  =========
scheme                                 ONNX form                   tolerance
=====================================  ==========================  =========
int4 g32 sym/asym, accuracy_level 0    MatMulNBits                 1e-5
int4 g32 sym, accuracy_level 4         MatMulNBits (int8 inputs)   5e-2 rel.
int8 per-channel sym/asym              int8/uint8 DequantizeLinear 1e-5
int2/int3 per-group                    uint8 codes + Sub/Mul       1e-5
float16 / bfloat16                     Cast                        1e-5
ActQuant 8-bit / 4-bit                 Q/DQ / float ops            1e-5
=====================================  ==========================  =========

PyTorch dequantizes weights to float32 and runs the float op; the exact forms differ only by
float32 summation order.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compactml.export import ort as cort
from compactml.export.onnx import export
from compactml.quantize import Half, QScheme, QuantConv2d, QuantLinear, WeightOnly, quantize
from compactml.quantize.affine import PerChannel


class MLP(nn.Module):
    """Embedding + three Linear layers with in_features 64, 128 and 256."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 64)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 256, bias=False)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.embed(ids)))
        return self.fc3(torch.relu(self.fc2(h)))


class ConvNet(nn.Module):
    """Convolutions with zero, "same" and reflect padding, groups, stride, and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 16, 3, padding="same")
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect", groups=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.conv3(h)).mean((2, 3)))


def _ids() -> torch.Tensor:
    return torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(1))


def _image() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))


def _exported(model: nn.Module, inputs, tmp_path, **kwargs) -> tuple[np.ndarray, np.ndarray, set]:
    """(ONNX Runtime output, PyTorch output, op types in the file)."""
    path = export(model, tmp_path / "m.onnx", inputs, **kwargs)
    got = cort.run(cort.session(path, threads=1), inputs)[0]
    with torch.no_grad():
        ref = model(inputs).numpy()
    return got, ref, {n.op_type for n in onnx.load(path).graph.node}


@pytest.fixture(scope="module")
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_g32_linear_uses_matmul_nbits(mlp, tmp_path, symmetric):
    q = quantize(mlp, WeightOnly(bits=4, group_size=32, symmetric=symmetric))
    got, ref, ops = _exported(q, _ids(), tmp_path)
    assert "MatMulNBits" in ops and "MatMul" not in ops
    assert np.abs(got - ref).max() < 1e-5
    with torch.no_grad():
        float_out = mlp(_ids()).numpy()
    assert np.abs(float_out - ref).max() > 1e-3  # the check above really compares 4-bit outputs


def test_int4_accuracy_level_4_is_close(mlp, tmp_path):
    q = quantize(mlp, WeightOnly(bits=4, group_size=32))
    got, ref, _ = _exported(q, _ids(), tmp_path, accuracy_level=4)
    assert np.abs(got - ref).max() < 5e-2 * np.abs(ref).max()
    path = export(q, tmp_path / "acc4.onnx", _ids(), accuracy_level=4)
    levels = [
        a.i
        for n in onnx.load(path).graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    ]
    assert levels == [4, 4, 4]


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_per_channel_uses_dequantize_linear(tmp_path, symmetric):
    torch.manual_seed(0)
    q = quantize(ConvNet().eval(), WeightOnly(bits=8, group_size=None, symmetric=symmetric))
    got, ref, ops = _exported(q, _image(), tmp_path)
    assert {"DequantizeLinear", "Conv", "Pad"} <= ops
    assert np.abs(got - ref).max() < 1e-5
    path = export(q, tmp_path / "c.onnx", _image())
    codes = {t.name: t.data_type for t in onnx.load(path).graph.initializer}
    wanted = onnx.TensorProto.INT8 if symmetric else onnx.TensorProto.UINT8
    assert codes["lowered/conv1.weight.codes"] == wanted


@pytest.mark.parametrize(("bits", "symmetric"), [(3, True), (2, False)])
def test_narrow_per_group_codes_via_generic_form(mlp, tmp_path, bits, symmetric):
    q = quantize(mlp, WeightOnly(bits=bits, group_size=16, symmetric=symmetric))
    got, ref, ops = _exported(q, _ids(), tmp_path)
    assert "MatMulNBits" not in ops and "MatMul" in ops
    assert np.abs(got - ref).max() < 1e-5


def test_per_tensor_and_per_column_schemes(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(24, 12)
    model = nn.Sequential(
        QuantLinear.from_float(layer, QScheme(bits=6, symmetric=False, granularity=PerChannel(1))),
        nn.ReLU(),
        QuantLinear.from_float(nn.Linear(12, 4), QScheme(bits=8, granularity=PerChannel(0))),
    ).eval()
    x = torch.randn(3, 24)
    got, ref, ops = _exported(model, x, tmp_path)
    assert "DequantizeLinear" in ops
    assert np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_weights_cast_to_float32(mlp, tmp_path, dtype):
    q = quantize(mlp, Half(dtype=dtype))
    got, ref, ops = _exported(q, _ids(), tmp_path)
    assert "Cast" in ops
    assert np.abs(got - ref).max() < 1e-5
    path = export(q, tmp_path / "h.onnx", _ids())
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    halves = [t for t in proto.graph.initializer if t.name.endswith(".half")]
    wanted = onnx.TensorProto.FLOAT16 if dtype == "float16" else onnx.TensorProto.BFLOAT16
    assert halves and all(t.data_type == wanted for t in halves)


def test_single_quantized_layer_as_the_model(tmp_path):
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(64, 8), QScheme(4, True, PerChannel(0)))
    got, ref, _ = _exported(layer, torch.randn(2, 64), tmp_path)
    assert np.abs(got - ref).max() < 1e-5


class StandInActQuant(nn.Module):
    """The interface of compactml.quantize.act.ActQuant: per-tensor fake quantization."""

    def __init__(self, scale: float, zero_point: int, bits: int = 8, signed: bool = False):
        super().__init__()
        self.bits, self.signed = bits, signed
        self.register_buffer("scale", torch.tensor(scale))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo = -(1 << (self.bits - 1)) if self.signed else 0
        hi = lo + (1 << self.bits) - 1
        return torch.fake_quantize_per_tensor_affine(
            x, float(self.scale), int(self.zero_point), lo, hi
        )


class ActModel(nn.Module):
    def __init__(self, conv: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.conv, self.fc = conv, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _act_model(bits: int, signed: bool) -> ActModel:
    torch.manual_seed(0)
    scheme = QScheme(bits=8, granularity=PerChannel(0))
    conv = QuantConv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), scheme)
    fc = QuantLinear.from_float(nn.Linear(8, 5), scheme)
    zero = 0 if signed else (1 << bits) // 2
    conv.input_quant = StandInActQuant(0.02, zero, bits, signed)
    fc.input_quant = StandInActQuant(0.01, 0 if signed else 3, bits, signed)
    return ActModel(conv, fc).eval()


def test_input_quant_becomes_quantize_dequantize(tmp_path):
    model = _act_model(8, signed=False)
    got, ref, ops = _exported(model, _image(), tmp_path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert np.abs(got - ref).max() < 1e-5
    without = ActModel(model.conv, model.fc)
    model.conv.input_quant = model.fc.input_quant = None
    with torch.no_grad():
        assert np.abs(without(_image()).numpy() - ref).max() > 1e-4  # quantizing inputs matters
    path = export(_act_model(8, signed=False), tmp_path / "a.onnx", _image())
    zp = {t.name: t.data_type for t in onnx.load(path).graph.initializer}
    assert zp["lowered/conv.input_zero_point"] == onnx.TensorProto.UINT8


def test_signed_and_narrow_input_quant(tmp_path):
    got, ref, ops = _exported(_act_model(4, signed=True), _image(), tmp_path)
    assert {"Round", "Clip"} <= ops
    assert np.abs(got - ref).max() < 1e-5
    got, ref, _ = _exported(_act_model(8, signed=True), _image(), tmp_path)
    assert np.abs(got - ref).max() < 1e-5


def test_a_layer_called_twice_is_lowered_twice(tmp_path):
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = QuantLinear.from_float(nn.Linear(32, 32), QScheme(4, True, PerChannel(0)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    got, ref, _ = _exported(Twice().eval(), torch.randn(2, 32), tmp_path)
    assert np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize(("k", "group"), [(96, 32), (48, 16)])
def test_matmul_nbits_odd_groups_per_row_pads_zero_points(tmp_path, k, group):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    q = quantize(model, WeightOnly(bits=4, group_size=group, symmetric=False, include=("0",)))
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3))
    got, ref, ops = _exported(q, x, tmp_path)
    assert "MatMulNBits" in ops
    assert np.abs(got - ref).max() < 1e-5
    init = {t.name: t for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    groups = k // group
    assert groups % 2 == 1 and list(init["lowered/0.weight.zero_point"].dims) == [
        7 * (groups + 1) // 2
    ]
