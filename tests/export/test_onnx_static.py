"""Static INT8 models in ONNX: the QDQ form ONNX Runtime fuses into integer kernels.

Fusion is checked on ORT's own optimized graph (``SessionOptions.optimized_model_filepath``).

Tolerance against the PyTorch Static model (the accuracy reference): ORT adds int32 biases
(rounded to ``input_scale * weight_scale``) and requantizes each fused op's output itself, so
quantized activations may differ by one code here and there and the float logits by a few
quantization steps of the last activations: max |ORT - PyTorch| <= 5% of max |logits|, top-1
agreement >= 90%. Single ``QuantOutput`` ops (no accumulation) match within one step.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.examples import digits_cnn
from compactml.examples.resnet import resnet18
from compactml.export import ort as cort
from compactml.export.onnx import export
from compactml.quantize.act import ActQuant
from compactml.quantize.modules import QuantOutput
from compactml.quantize.ptq import Static
from compactml.task import Task


def optimized_ops(path: Path) -> collections.Counter:
    """Op counts of ONNX Runtime's optimized graph of the model at ``path``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(
        n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node
    )


def _check_close(path: Path, model: nn.Module, x: torch.Tensor) -> None:
    got = cort.run(cort.session(path), x)[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory) -> tuple[Path, nn.Module, torch.Tensor]:
    """A width-8 ResNet-18 quantized with Static and exported."""
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(3)]
    q = Static(progress=False).apply(resnet18(num_classes=10, width=8), Task(calib=calib))
    x = torch.randn(16, 3, 32, 32, generator=g)
    path = export(q, tmp_path_factory.mktemp("static") / "resnet.onnx", x[:1])
    return path, q, x


def test_resnet_runs_every_conv_and_residual_add_on_integers(resnet_onnx):
    path, _, _ = resnet_onnx
    ops = optimized_ops(path)
    assert ops["QLinearConv"] == 20 and ops["QLinearAdd"] == 8
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1
    for float_op in ("Conv", "FusedConv", "Add", "Relu", "MatMul", "Gemm"):
        assert ops[float_op] == 0, float_op
    assert ops["DequantizeLinear"] == 0 and ops["QuantizeLinear"] == 1  # the graph input only


def test_resnet_onnx_matches_pytorch_static(resnet_onnx):
    path, q, x = resnet_onnx
    _check_close(path, q, x)


def test_weights_are_int8_per_channel_and_activations_uint8(resnet_onnx):
    path, _, _ = resnet_onnx
    graph = onnx.load(path).graph
    init = {t.name: t for t in graph.initializer}
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and ".weight" in n.name]
    assert weights and all(init[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weights)
    assert all(len(init[n.input[1]].dims) == 1 for n in weights)  # one scale per channel
    biases = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("bias")]
    assert biases and all(init[n.input[0]].data_type == onnx.TensorProto.INT32 for n in biases)
    quants = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert all(init[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in quants)


def test_digits_cnn_fuses_and_keeps_its_accuracy_in_ort(tmp_path):
    model, task = digits_cnn.load(progress=False)
    q = Static(progress=False).apply(model, task)
    path = export(q, tmp_path / "digits.onnx", task.example_input())
    ops = optimized_ops(path)
    assert ops["QLinearConv"] == 3 and ops["Conv"] == 0
    x, _ = next(task.batches("eval"))
    _check_close(path, q, x)


@pytest.mark.parametrize(
    "inner",
    [nn.ReLU(), nn.ReLU6(), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)],
    ids=lambda m: type(m).__name__,
)
def test_quant_output_lowering_matches_pytorch_within_one_step(tmp_path, inner):
    layer = QuantOutput(inner, ActQuant(8, False, 0.03, 20))
    x = torch.randn(2, 4, 8, 8) * 3
    path = export(nn.Sequential(layer), tmp_path / "q.onnx", x)
    got = cort.run(cort.session(path), x)[0]
    with torch.no_grad():
        ref = layer(x).numpy()
    assert np.abs(got - ref).max() <= 0.03 + 1e-6
    assert np.mean(got == ref) > 0.99


def test_quant_output_around_unsupported_module_is_refused(tmp_path):
    layer = QuantOutput(nn.GELU(), ActQuant(8, False, 0.03, 20))
    with pytest.raises(CompactMLError, match="cannot export QuantOutput around GELU"):
        export(nn.Sequential(layer), tmp_path / "q.onnx", torch.randn(1, 4))
