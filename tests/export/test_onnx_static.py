"""Static INT8 models in ONNX: the QDQ form ONNX Runtime fuses into integer kernels.

Fusion is checked on ORT's own optimized graph (``SessionOptions.optimized_model_filepath``).

Tolerance against the PyTorch Static model (the accuracy reference): ORT adds int32 biases
(rounded to ``input_scale * weight_scale``) and requantizes each fused op's output itself, so
quantized activations may differ by one code here and there. Whole networks: max |ORT - PyTorch|
of the logits <= one quantization step of the classifier's input (measured: 0.66 and 0.85 of
it for the ResNet and digits CNN below), and the same top-1 wherever PyTorch's top-2 margin is
over twice that. Single layers (one requantization or none) match within 1e-4 relative;
single ``QuantOutput`` ops match within one step.
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
from compactml.export.artifact import load, save
from compactml.export.onnx import export
from compactml.export.onnx_static import drop_identity_activations
from compactml.quantize.act import ActQuant
from compactml.quantize.affine import PerChannel, PerGroup, QScheme
from compactml.quantize.modules import QuantConv2d, QuantLinear, QuantOutput
from compactml.quantize.ptq import Static
from compactml.quantize.qat import QAT
from compactml.source import load_factory
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


def _check_close(path: Path, model: nn.Module, x: torch.Tensor, last: nn.Module) -> None:
    """ORT's logits within one step of ``last``'s input quantizer of PyTorch's, same top-1.

    ORT requantizes between layers with its own float arithmetic, so an intermediate code
    can land one step away from PyTorch's on a rounding tie; such a flip moves a logit by
    about a weight times a step. Allowed: a few logits past one step, none past two.
    """
    got = cort.run(cort.session(path), x)[0]
    with torch.no_grad():
        ref = model(x).numpy()
    step = float(last.input_quant.scale)
    err = np.abs(got - ref) / step
    assert err.max() <= 2.0
    assert (err > 1.0).mean() <= 0.01
    top2 = np.sort(ref, axis=1)[:, -2:]
    confident = top2[:, 1] - top2[:, 0] > 2 * step
    assert confident.mean() > 0.5
    assert (got.argmax(1) == ref.argmax(1))[confident].all()


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
    _check_close(path, q, x, q.fc)


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
    _check_close(path, q, x, q.classifier)


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


def _run(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ORT output, PyTorch output) of ``model`` exported to ``path``."""
    export(model, path, x)
    with torch.no_grad():
        return cort.run(cort.session(path), x)[0], model(x).numpy()


def _quantized(layer: nn.Module, scheme: QScheme, s_in: float = 0.025, relu: bool = True):
    """``layer`` quantized with ``scheme`` and an 8-bit uint8 input quantizer, then (``relu``)
    a ReLU quantized with step 0.03 (which lets ORT fuse the layer into an integer kernel)."""
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    q = cls.from_float(layer, scheme)
    q.input_quant = ActQuant(8, False, s_in, 118)
    out = [QuantOutput(nn.ReLU(), ActQuant(8, False, 0.03, 0))] if relu else []
    return nn.Sequential(q, *out).eval()


@pytest.mark.parametrize("bits", [4, 3], ids=["matmul_nbits", "generic"])
def test_per_group_weight_with_8bit_input_keeps_float_bias(tmp_path, bits):
    torch.manual_seed(0)
    model = _quantized(nn.Linear(64, 16), QScheme(bits, True, PerGroup(32)), relu=False)
    got, ref = _run(model, torch.randn(5, 64), tmp_path / "g.onnx")
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    init = {t.name: t for t in onnx.load(tmp_path / "g.onnx").graph.initializer}
    assert init["lowered/0.bias"].data_type == onnx.TensorProto.FLOAT


def test_qat_with_group_size_and_8bit_activations_exports(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 64, generator=g) for _ in range(2)]
    train = [(torch.randn(8, 64, generator=g), torch.randint(0, 4, (8,), generator=g))]
    config = QAT(weight_bits=4, act_bits=8, group_size=32, epochs=0, progress=False)
    q = config.apply(model, Task(calib=calib, train=train)).eval()
    assert q[0].input_quant is not None and isinstance(q[0].scheme.granularity, PerGroup)
    got, ref = _run(q, calib[0], tmp_path / "qat.onnx")
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def _zero_channel(layer: nn.Module, weights: float) -> nn.Module:
    """``layer`` with output channel 1's weights set to ``weights`` and its bias to 5."""
    with torch.no_grad():
        layer.weight[1] = weights
        layer.bias[1] = 5.0
    return layer


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_all_zero_weight_channel_bias_fits_int32_and_matches(tmp_path, kind):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1) if kind == "conv" else nn.Linear(16, 4)
    model = _quantized(_zero_channel(layer, 0.0), QScheme(8, True, PerChannel(0)))
    assert float(model[0].scale[1]) < 1e-6  # 5 / (0.025 * scale) is far over 2**31
    x = torch.randn(4, 3, 8, 8) if kind == "conv" else torch.randn(4, 16)
    got, ref = _run(model, x, tmp_path / "z.onnx")
    assert np.abs(got - ref).max() <= 0.03 + 1e-6 and np.mean(got == ref) > 0.95  # one step
    assert np.abs(got[:, 1] - 5.01).max() < 1e-6  # channel 1: relu(bias) = 167 steps of 0.03
    assert optimized_ops(tmp_path / "z.onnx")["QLinearConv" if kind == "conv" else "QGemm"] == 1
    init = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in onnx.load(tmp_path / "z.onnx").graph.initializer
    }
    scale = init["lowered/0.weight.scale"]
    assert np.array_equal(np.delete(scale, 1), np.delete(model[0].scale.numpy(), 1))
    assert init["lowered/0.bias.int32"].dtype == np.int32


def test_bias_overflow_with_nonzero_weights_is_refused(tmp_path):
    layer = _zero_channel(nn.Linear(16, 4), 1e-5)
    model = _quantized(layer, QScheme(8, True, PerChannel(0)), s_in=1e-4)
    with pytest.raises(CompactMLError, match="output channel 1 .* int32 bias would overflow"):
        export(model, tmp_path / "o.onnx", torch.randn(2, 16))


CONCAT_FACTORY = """
import torch
import torch.nn.functional as F
from torch import nn


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.c, self.d = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), torch.relu(self.b(x))], 1)
        h = self.d(F.relu(self.c(h)))
        return self.fc(self.pool(h).flatten(1))


def build():
    torch.manual_seed(0)
    return Inception().eval()
"""


@pytest.fixture(scope="module")
def concat_static(tmp_path_factory) -> tuple[Path, nn.Module, torch.Tensor]:
    """The factory-built Inception-like model, Static-quantized and exported (``export`` drops
    the identity ReLUs after DequantizeLinears itself, see ``drop_identity_activations``)."""
    folder = tmp_path_factory.mktemp("concat")
    factory = folder / "inception.py"
    factory.write_text(CONCAT_FACTORY)
    model, _ = load_factory(f"{factory}:build")
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 3, 8, 8, generator=g),) for _ in range(3)]
    q = Static(progress=False).apply(model, Task(calib=calib))
    x = torch.randn(32, 3, 8, 8, generator=g)
    path = export(q, folder / "inception.onnx", x[:1])
    # export already removed the identity relus: nothing is left for a second pass
    assert drop_identity_activations(onnx.load(path)) == 0
    return path, q, x


def test_concat_and_functional_relus_run_on_integers(concat_static):
    path, _, _ = concat_static
    ops = optimized_ops(path)
    assert ops["QLinearConcat"] == 1 and ops["QLinearConv"] == 4
    for float_op in ("Concat", "Relu", "Conv", "FusedConv", "Gemm", "MatMul"):
        assert ops[float_op] == 0, float_op


def test_concat_model_matches_pytorch_and_round_trips(concat_static, tmp_path):
    path, q, x = concat_static
    _check_close(path, q, x, q.fc)
    loaded = load(save(q, tmp_path / "inception.cml"), trust_factory=True)
    assert repr(loaded) == repr(q)
    state, again = q.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) and state[k].dtype == again[k].dtype for k in state)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def _dq_then(op: str, scale: float, zero: int, clip_max: float | None = None) -> onnx.ModelProto:
    """``x (uint8) -> DequantizeLinear -> op -> Identity -> y``."""
    h = onnx.helper
    inits = [
        onnx.numpy_helper.from_array(np.array(scale, np.float32), "s"),
        onnx.numpy_helper.from_array(np.array(zero, np.uint8), "z"),
    ]
    inputs = ["d"]
    if clip_max is not None:
        inits += [onnx.numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
                  (("lo", 0.0), ("hi", clip_max))]  # fmt: skip
        inputs += ["lo", "hi"]
    nodes = [
        h.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
        h.make_node(op, inputs, ["r"]),
        h.make_node("Identity", ["r"], ["y"]),
    ]
    graph = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.UINT8, [4])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], inits,
    )  # fmt: skip
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize(
    ("op", "scale", "zero", "clip_max", "dropped"),
    [
        ("Relu", 0.1, 0, None, 1),
        ("Relu", 0.1, 3, None, 0),  # codes below 3 are negative: the relu is not an identity
        ("Clip", 0.02, 0, 6.0, 1),  # 255 * 0.02 = 5.1 <= 6
        ("Clip", 0.1, 0, 6.0, 0),  # 25.5 > 6: the clip cuts
    ],
)
def test_drop_identity_activations_only_drops_exact_identities(op, scale, zero, clip_max, dropped):
    proto = _dq_then(op, scale, zero, clip_max)
    codes = np.array([0, 2, 100, 255], np.uint8)
    before = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": codes})[0]
    assert drop_identity_activations(proto) == dropped
    onnx.checker.check_model(proto)
    assert [n.op_type for n in proto.graph.node].count(op) == 1 - dropped
    after = ort.InferenceSession(proto.SerializeToString()).run(None, {"x": codes})[0]
    assert np.array_equal(before, after)  # dropped or not, the model computes the same


# (kernel, stride, padding, input size, symmetric weights, space-to-depth expected)
S2D_CASES = [
    (7, 2, 3, 32, True, True),  # ResNet's stem
    (3, 2, 1, 17, False, True),  # odd size, asymmetric weight codes padded with zero points
    (5, 3, 2, 20, True, True),  # kernel not a multiple of the stride
    (4, 4, 0, 21, False, False),  # the last input row is never read: plain convolution
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "size", "symmetric", "s2d"), S2D_CASES)
def test_strided_stem_conv_in_space_to_depth_form_is_bit_exact(
    tmp_path, monkeypatch, kernel, stride, padding, size, symmetric, s2d
):
    from compactml.export import onnx_lowering

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, kernel, stride=stride, padding=padding)
    model = _quantized(conv, QScheme(8, symmetric, PerChannel(0)))
    x = torch.randn(2, 3, size, size)
    got, ref = _run(model, x, tmp_path / "s2d.onnx")
    ops = {n.op_type for n in onnx.load(tmp_path / "s2d.onnx").graph.node}
    assert ("SpaceToDepth" in ops) == s2d
    assert optimized_ops(tmp_path / "s2d.onnx")["QLinearConv"] == 1
    monkeypatch.setattr(onnx_lowering, "S2D_MAX_CHANNELS", 0)
    plain, _ = _run(model, x, tmp_path / "plain.onnx")
    assert "SpaceToDepth" not in {n.op_type for n in onnx.load(tmp_path / "plain.onnx").graph.node}
    np.testing.assert_array_equal(got, plain)  # the same integer sums: identical codes
    assert np.abs(got - ref).max() <= 0.03 + 1e-6  # one step of the output quantizer


def test_resnet_stem_is_exported_in_space_to_depth_form(resnet_onnx):
    path, _, _ = resnet_onnx
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "SpaceToDepth"]
    assert [n.name for n in nodes] == ["lowered/conv1.input_s2d"]
