"""Static INT8: where the activation quantizers go, calibration, errors, the artifact round
trip, and the digits-cnn quality target for every observer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compactml.config import history
from compactml.errors import CompactMLError
from compactml.evaluate import evaluate
from compactml.examples import digits_cnn
from compactml.examples.resnet import resnet18
from compactml.export.artifact import load, save
from compactml.quantize.act import ActQuant
from compactml.quantize.dataflow import trace_dataflow
from compactml.quantize.modules import QuantConv2d, QuantLinear, QuantOutput
from compactml.quantize.ptq import Static
from compactml.task import Task
from compactml.techniques import technique_from_dict


def _images(n: int = 3, batch: int = 4, size: int = 32, seed: int = 0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_resnet() -> tuple[nn.Module, nn.Module, list[tuple]]:
    """A width-8 ResNet-18 and its Static copy, calibrated on random images."""
    model = resnet18(num_classes=10, width=8)
    calib = _images()
    return model, Static(progress=False).apply(model, Task(calib=calib)), calib


def test_resnet_quantizers_sit_where_ort_fuses_them(tiny_resnet):
    model, q, _ = tiny_resnet
    convs = [m for m in q.modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 20 and isinstance(q.fc, QuantLinear)
    assert all(c.input_quant is not None for c in convs)
    for block in (q.layer1[0], q.layer2[0], q.layer4[1]):
        assert block.conv1.output_quant is None  # its ReLU alone reads it: quantize after ReLU
        assert isinstance(block.relu1, QuantOutput) and int(block.relu1.quant.zero_point) == 0
        assert block.conv2.output_quant is not None  # feeds the residual add
        assert isinstance(block.relu2, QuantOutput)  # after the add
        # the next conv reads the ReLU's output: one shared scale, no Q-DQ-Q-DQ of two scales
        assert float(block.conv2.input_quant.scale) == float(block.relu1.quant.scale)
    assert float(q.layer2[0].downsample[0].input_quant.scale) == float(
        q.layer1[1].relu2.quant.scale
    )
    assert isinstance(q.maxpool, QuantOutput) and isinstance(q.avgpool, QuantOutput)
    assert float(q.maxpool.quant.scale) == float(q.relu.quant.scale)
    assert q.fc.output_quant is None  # logits stay float
    assert isinstance(model.relu, nn.ReLU) and isinstance(model.conv1, nn.Conv2d)  # unchanged


def test_resnet_static_stays_close_to_float(tiny_resnet):
    model, q, calib = tiny_resnet
    x = calib[0][0]
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.75


def test_quantized_activations_lie_on_their_grid(tiny_resnet):
    _, q, calib = tiny_resnet
    seen = {}
    q.layer1[0].relu2.register_forward_hook(lambda m, a, out: seen.update(y=out))
    with torch.no_grad():
        q(calib[1][0])
    quant = q.layer1[0].relu2.quant
    codes = seen["y"] / quant.scale + quant.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.min() >= 0 and codes.max() <= 255


def test_history_records_changes_and_float_layers(tiny_resnet):
    _, q, _ = tiny_resnet
    entry = history(q)[-1]
    assert entry["technique"] == "Static"
    assert "layer1.0.conv1" in entry["changed"] and "layer1.0.bn1" in entry["changed"]
    assert "layer1.0.relu2" in entry["changed"] and entry["float_layers"] == []
    assert entry["activation_scales"] < entry["activation_quantizers"]  # shared scales


def test_excluded_layers_stay_float_and_are_reported():
    model = resnet18(num_classes=10, width=8)
    q = Static(progress=False, exclude=("fc",)).apply(model, Task(calib=_images(1)))
    assert type(q.fc) is nn.Linear
    assert history(q)[-1]["float_layers"] == ["fc"]


class FunctionalRelu(nn.Module):
    """A conv whose output feeds a functional relu, and an in-place ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv2(torch.relu(self.conv(x))))
        return self.fc(h.mean((2, 3)))


def test_functional_relu_is_quantized_after_it_and_inplace_relu_is_wrapped():
    torch.manual_seed(0)
    q = Static(progress=False).apply(FunctionalRelu(), Task(calib=_images(2, size=8)))
    # torch.relu's output is read by conv2 only: conv2's input quantizer sits after the relu
    assert q.conv.output_quant is None and int(q.conv2.input_quant.zero_point) == 0
    assert isinstance(q.act, QuantOutput) and q.conv2.output_quant is None
    flow = trace_dataflow(FunctionalRelu(), torch.randn(1, 3, 8, 8))
    conv_out = flow.module_node("conv").outputs[0]
    assert [(n.op, n.act) for n in flow.consumers[conv_out]] == [("relu", "relu")]


@pytest.mark.parametrize(
    ("call", "act"),
    [
        (lambda x: F.relu(x, inplace=True), "relu"),
        (lambda x: x.clamp(min=0), "relu"),
        (lambda x: torch.clamp(x, 0, 6), "relu6"),
        (F.relu6, "relu6"),
        (lambda x: F.hardtanh(x, 0.0, 6.0), "relu6"),
        (lambda x: x.clamp(min=-1), None),
        (F.hardtanh, None),
        (torch.sigmoid, None),
    ],
)
def test_dataflow_marks_functional_relus(call, act):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return call(self.conv(x)) * 2

    flow = trace_dataflow(Net(), torch.randn(1, 3, 4, 4))
    reader = flow.consumers[flow.module_node("conv").outputs[0]][0]
    assert reader.act == act


class ConcatBranches(nn.Module):
    """Two conv branches with functional relus, concatenated, then a conv (Inception-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), torch.relu(self.b(x)) * 3], 1)
        return self.c(h).mean((2, 3))


def test_concat_inputs_share_the_concat_scale_and_relu_range():
    torch.manual_seed(0)
    q = Static(progress=False).apply(ConcatBranches(), Task(calib=_images(2, size=8)))
    # a: F.relu then cat: no module after the relu, so a quantizes over the relu's range
    assert int(q.a.output_quant.zero_point) == 0
    # b's relu output is scaled before the cat: quantized over its own relu range, not shared
    assert int(q.b.output_quant.zero_point) == 0
    assert float(q.b.output_quant.scale) != float(q.c.input_quant.scale)
    assert float(q.a.output_quant.scale) == float(q.c.input_quant.scale)  # shared
    x = _images(1, size=8)[0][0]
    with torch.no_grad():
        codes = q.a(x) / q.a.output_quant.scale
        assert codes.min() >= 0 and torch.allclose(codes, codes.round(), atol=1e-3)
        hb = torch.relu(q.b(x)) * 3  # c's shared range covers both branches
        assert float(q.c.input_quant.scale) * 255 >= float(hb.max()) * 0.999


def test_calib_batches_limits_calibration():
    class Counting(nn.Sequential):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    model = Counting(nn.Conv2d(3, 4, 3), nn.ReLU())
    Static(progress=False, calib_batches=2).apply(model, Task(calib=_images(5, size=8)))
    assert Counting.calls == 1 + 2  # the dataflow trace (no BatchNorm to fold) + 2 batches


def test_static_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(CompactMLError, match="calibration data"):
        Static().apply(model, None)
    with pytest.raises(CompactMLError, match="calibration data"):
        Static().apply(model, Task(eval=_images(1)))
    with pytest.raises(CompactMLError, match="unknown observer"):
        Static(observer="kl")
    with pytest.raises(CompactMLError, match="calib_batches"):
        Static(calib_batches=0)
    with pytest.raises(CompactMLError, match="bits"):
        Static(bits=9)
    with pytest.raises(CompactMLError, match="no Linear or Conv2d"):
        Static(include=("nothing",)).apply(model, Task(calib=_images(1, size=8)))
    assert technique_from_dict("static", {"observer": "mse"}) == Static(observer="mse")


def test_nan_during_calibration_names_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    good = _images(1, size=8)[0][0]
    bad = good.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CompactMLError, match=r"NaN or inf at the 0 input of layer '0'"):
        Static(progress=False).apply(model, Task(calib=[(bad,)], example=good))


@pytest.mark.slow
@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "entropy"])
def test_digits_cnn_static_int8_loses_at_most_half_a_point(observer):
    model, task = digits_cnn.load(progress=False)
    baseline = evaluate(model, task, noise_levels=())["top1"]
    q = Static(observer=observer, progress=False).apply(model, task)
    assert evaluate(q, task, noise_levels=())["top1"] >= baseline - 0.005


def test_artifact_round_trip_keeps_quantizers(tmp_path):
    model, task = digits_cnn.load(progress=False)
    q = Static(progress=False, calib_batches=1).apply(model, task)
    loaded = load(save(q, tmp_path / "static.cml"))
    assert isinstance(loaded.features.relu1, QuantOutput)
    assert isinstance(loaded.features.relu1.quant, ActQuant)
    x = task.example_input()
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
