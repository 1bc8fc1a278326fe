"""Dynamic INT8 in ONNX: MatMulInteger on per-token uint8 activations, matching PyTorch.

Tolerance (one ``DynamicQuantLinear``, ONNX Runtime against the PyTorch layer): max abs
difference at most ``ORT_TOLERANCE`` (1e-5) times the largest output magnitude; both compute
the same codes and scales, and differ only by float32 summation order. Several stacked layers
are checked at 1e-4 (a float-level difference can move one token's value across a rounding
boundary in the next layer).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compactml.export import ort as cort
from compactml.export.onnx import export
from compactml.export.onnx_dynamic import ORT_TOLERANCE
from compactml.quantize import Dynamic, quantize


class Tokens(nn.Module):
    """Two Linear layers applied to every token of a ``(batch, tokens, 64)`` input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tokens_input(batch: int = 3, tokens: int = 7) -> torch.Tensor:
    x = torch.randn(batch, tokens, 64) * torch.rand(batch, tokens, 1) * 4
    x[0, 0] = 0  # an all-zero token
    return x


def rel_error(a: np.ndarray, b: torch.Tensor) -> float:
    b = b.detach().numpy()
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_one_layer_matches_pytorch_within_the_stated_tolerance(tmp_path):
    torch.manual_seed(0)
    layer = quantize(nn.Linear(64, 48), Dynamic())
    for i, shape in enumerate(((3, 7, 64), (1, 128, 64), (5, 64), (2, 2, 5, 64))):
        x = torch.randn(*shape) * 3
        sess = cort.session(export(layer, tmp_path / f"layer{i}.onnx", x))
        assert rel_error(cort.run(sess, x)[0], layer(x)) <= ORT_TOLERANCE, shape
    zero = torch.zeros(2, 2, 5, 64)  # all-zero tokens: exactly the bias
    assert np.allclose(cort.run(sess, zero)[0], layer.bias.detach().numpy())


def test_integer_matmul_on_uint8_activations_and_int8_weights(tmp_path):
    torch.manual_seed(0)
    model = quantize(Tokens().eval(), Dynamic())
    proto = onnx.load(export(model, tmp_path / "m.onnx", tokens_input()))
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMulInteger"]
    assert len(matmuls) == 2
    assert not [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    inits = {i.name: i for i in proto.graph.initializer}
    weight = inits[matmuls[0].input[1]]
    assert weight.data_type == onnx.TensorProto.INT8 and list(weight.dims) == [64, 96]
    assert inits[matmuls[0].input[2]].data_type == onnx.TensorProto.UINT8  # zero point 128
    quants = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quants) == 2 and inits[quants[0].input[2]].data_type == onnx.TensorProto.UINT8
    assert {op.domain for op in proto.opset_import} <= {"", "ai.onnx"}  # standard ops only
    x = tokens_input()
    out = cort.run(cort.session(tmp_path / "m.onnx"), x)[0]
    assert rel_error(out, model(x)) <= 1e-4


def test_onnx_runtime_fuses_the_scaling_into_matmul_integer_to_float(tmp_path):
    torch.manual_seed(0)
    model = quantize(Tokens().eval(), Dynamic())
    export(model, tmp_path / "m.onnx", tokens_input())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMulInteger" not in ops
    assert ops.count("Add") == 1  # fc1's bias stays outside the fused op (per-token scale)


@pytest.mark.parametrize("opset", [17, 18, 20])
def test_exports_at_newer_opsets(tmp_path, opset):
    torch.manual_seed(0)
    model = quantize(Tokens().eval(), Dynamic())
    x = tokens_input(2, 5)
    path = export(model, tmp_path / f"m{opset}.onnx", x, opset=opset)
    assert rel_error(cort.run(cort.session(path), x)[0], model(x)) <= 1e-4


def test_per_tensor_layers_fuse_into_dynamic_quantize_matmul_with_their_bias(tmp_path):
    torch.manual_seed(0)
    model = quantize(Tokens().eval(), Dynamic(per_tensor=("fc1",)))
    assert model.fc1.activation == "tensor" and model.fc2.activation == "token"
    x = tokens_input()
    path = export(model, tmp_path / "m.onnx", x)
    assert [n.op_type for n in onnx.load(path).graph.node].count("DynamicQuantizeLinear") == 1
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 1 and ops.count("MatMulIntegerToFloat") == 1
    assert "Add" not in ops  # fc1's bias went into the fused op
    assert rel_error(cort.run(cort.session(path), x)[0], model(x)) <= 1e-4


class Shared(nn.Module):
    """Three Linear layers reading one input, as q, k and v do."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(64, 32) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * self.k(x) + self.v(x)


def test_per_tensor_layers_reading_one_input_share_its_quantization_in_onnx_runtime(tmp_path):
    """What Dynamic(per_tensor="auto") relies on when it decides such layers together: their
    DynamicQuantizeLinear nodes are identical, and ONNX Runtime keeps one."""
    torch.manual_seed(0)
    model = quantize(Shared().eval(), Dynamic(per_tensor=("*",)))
    x = tokens_input()
    path = export(model, tmp_path / "m.onnx", x)
    assert [n.op_type for n in onnx.load(path).graph.node].count("DynamicQuantizeLinear") == 3
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("DynamicQuantizeLinear") == 1 and ops.count("MatMulIntegerToFloat") == 3
    assert rel_error(cort.run(cort.session(path), x)[0], model(x)) <= 1e-4


def test_one_per_tensor_layer_matches_pytorch_within_the_stated_tolerance(tmp_path):
    torch.manual_seed(0)
    layer = quantize(nn.Linear(64, 48), Dynamic(per_tensor=("*",)))
    for i, shape in enumerate(((3, 7, 64), (5, 64), (2, 2, 5, 64))):
        x = torch.randn(*shape) * 3 + 0.5
        sess = cort.session(export(layer, tmp_path / f"layer{i}.onnx", x))
        assert rel_error(cort.run(sess, x)[0], layer(x)) <= ORT_TOLERANCE, shape
    zero = torch.zeros(2, 2, 5, 64)  # scale 1, zero point 0: exactly the bias
    assert np.allclose(cort.run(sess, zero)[0], layer.bias.detach().numpy())
