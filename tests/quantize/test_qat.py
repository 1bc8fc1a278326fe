"""QAT: BatchNorm folding, LSQ weight steps, exact freezing, the .cml round trip, and the
digits-cnn target (QAT recovers what post-training quantization loses)."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from compactml.config import history
from compactml.errors import CompactMLError
from compactml.export.artifact import load, save
from compactml.quantize import QAT, WeightOnly, quantize
from compactml.quantize.act import ActQuant
from compactml.quantize.affine import PerChannel, QScheme
from compactml.quantize.modules import QuantConv2d, QuantLinear
from compactml.quantize.qat import QATLayer, WeightQuant, fold_batchnorm, fold_model, train
from compactml.task import Task
from compactml.techniques import technique_from_dict


def _random_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn.eval()


class ConvBN(nn.Module):
    """conv -> bn -> relu in a Sequential, plus a conv/bn pair that is NOT conv-then-bn."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(1, 8, 3, padding=1), bn=_random_bn(8), relu=nn.ReLU())
        )
        self.side = nn.Conv2d(8, 8, 1)
        self.norm = _random_bn(8)  # defined after side, but applied to body's output
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        h = self.side(self.norm(h))
        return self.fc(h.flatten(1))


def _task(model: nn.Module, n: int = 6, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(16, 1, 4, 4, generator=g) for _ in range(n)]
    with torch.no_grad():
        batches = [(x, model(x).argmax(1)) for x in xs]
    return Task(calib=batches[:2], train=batches, eval=batches, metric="accuracy")


@pytest.mark.parametrize(("bias", "groups"), [(False, 1), (True, 2)])
def test_fold_batchnorm_matches_conv_then_bn(bias, groups):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=bias, groups=groups), _random_bn(6)
    weight = conv.weight.clone()
    x = torch.randn(2, 4, 5, 5)
    fused = fold_batchnorm(conv, bn)
    assert fused.bias is not None and torch.equal(conv.weight, weight)
    assert torch.allclose(fused(x), bn(conv(x)), atol=1e-5)


def test_fold_refuses_a_batchnorm_without_statistics():
    with pytest.raises(CompactMLError, match="running statistics"):
        fold_batchnorm(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))


def test_fold_model_folds_only_a_bn_fed_by_its_conv():
    torch.manual_seed(0)
    model = ConvBN().eval()
    x = torch.rand(3, 1, 4, 4)
    expected = model(x)
    folded = fold_model(model, {"body.conv", "side"}, _task(model))
    assert folded == ["body.bn"]
    assert isinstance(model.body.bn, nn.Identity) and model.body.conv.bias is not None
    assert isinstance(model.norm, nn.BatchNorm2d)  # side -> norm are consecutive, not chained
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_weight_steps_start_at_the_weight_range_and_get_the_lsq_gradient():
    w = torch.tensor([[0.7, -0.1, 0.32, -0.05], [0.2, 0.02, -0.1, 0.05]])
    quant = WeightQuant(w, QScheme(3, True, PerChannel(0)), learn=True)
    step = quant.step().detach()
    assert torch.all(step >= torch.tensor([0.7 / 3, 0.2 / 3]))  # float16 rounded up
    assert torch.equal(step, step.half().float())
    quant(w).sum().backward()
    v = w / step.reshape(-1, 1)
    inside = (torch.round(v) >= -4) & (torch.round(v) <= 3)
    per_weight = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), -4, 3))
    expected = per_weight.sum(1) / math.sqrt(4 * 3)
    assert torch.allclose(quant.scale.grad, expected, atol=1e-6)


def test_frozen_model_equals_the_training_model():
    torch.manual_seed(0)
    model = ConvBN().eval()
    task = _task(model)
    config = QAT(weight_bits=3, epochs=2, lr=1e-2, progress=False)
    trained, names, _ = config.prepare(model, task)
    train(trained, task, 2, 1e-2, progress=False)
    with torch.no_grad():
        for layer in trained.modules():  # steps off float16 values: freezing must round them
            if isinstance(layer, WeightQuant):
                layer.scale.mul_(1.0001)
    x = torch.rand(5, 1, 4, 4)
    with torch.no_grad():
        expected = trained(x)
    for name in names:
        layer = trained.get_submodule(name)
        assert isinstance(layer, QATLayer)
        frozen = layer.freeze()
        assert type(frozen) in (QuantLinear, QuantConv2d)
        assert isinstance(frozen.input_quant, ActQuant) and not frozen.input_quant.learn
        parent, _, leaf = name.rpartition(".")
        setattr(trained.get_submodule(parent) if parent else trained, leaf, frozen)
    assert torch.allclose(trained(x), expected, atol=1e-5)
    assert torch.equal(trained(x), expected)


def test_apply_trains_records_and_leaves_the_input_alone():
    torch.manual_seed(0)
    model = ConvBN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = _task(model)
    ptq = QAT(weight_bits=2, epochs=0, progress=False).apply(model, task)
    qat = QAT(weight_bits=2, epochs=8, lr=3e-3, progress=False).apply(model, task)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not qat.training and isinstance(qat.body.bn, nn.Identity)
    assert isinstance(qat.fc, QuantLinear) and qat.fc.input_quant.bits == 8
    assert not any(isinstance(p, nn.Parameter) and p.ndim == 0 for p in qat.parameters())
    entry = history(qat)[-1]
    assert entry["technique"] == "QAT" and set(entry["changed"]) == {
        "body.conv",
        "side",
        "fc",
        "body.bn",
    }

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(float(task.batch_loss(m, b)) for b in task.batches("train"))

    assert loss(qat) < loss(ptq)
    assert not torch.equal(qat.fc.input_quant.scale, ptq.fc.input_quant.scale)  # learned


def test_no_training_and_float_inputs_is_round_to_nearest_per_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    task = _task(model)
    qat = QAT(weight_bits=4, act_bits=None, epochs=0).apply(model, task)
    rtn = WeightOnly(bits=4, group_size=None).apply(model)
    x = torch.randn(3, 1, 4, 4)
    assert qat[1].input_quant is None
    assert torch.equal(qat[1].qweight, rtn[1].qweight) and torch.equal(qat(x), rtn(x))


def test_bad_configs_are_user_errors():
    for kwargs in (
        {"weight_bits": 9},
        {"act_bits": 1},
        {"group_size": 24},
        {"epochs": -1},
        {"lr": 0},
        {"learn_scales": "yes"},
    ):
        with pytest.raises(CompactMLError):
            QAT(**kwargs)
    with pytest.raises(CompactMLError, match="needs a Task"):
        quantize(nn.Linear(4, 4), QAT())
    with pytest.raises(CompactMLError, match="no Linear or Conv2d"):
        QAT(include=("nothing",)).apply(nn.Sequential(nn.Linear(4, 4)), Task(calib=[]))
    config = technique_from_dict("qat", {"weight_bits": 3, "epochs": 1})
    assert isinstance(config, QAT) and config.weight_bits == 3


@pytest.fixture(scope="module")
def digits():
    from compactml.examples import digits_cnn

    return digits_cnn.load(progress=False)


def _accuracy(model: nn.Module, task: Task) -> float:
    right = total = 0
    with torch.no_grad():
        for x, y in task.batches("eval"):
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total


def test_digits_qat_recovers_what_post_training_quantization_loses(digits):
    model, task = digits
    fp32 = _accuracy(model, task)
    assert fp32 == pytest.approx(0.9889, abs=1e-3)
    results = {}
    for bits in (4, 3):
        for epochs in (0, 3):
            config = QAT(weight_bits=bits, epochs=epochs, lr=1e-4, progress=False)
            results[bits, epochs] = _accuracy(config.apply(model, task), task)
    assert results[4, 3] >= fp32 - 0.005  # w4a8 QAT within half a point
    assert results[3, 0] < fp32 - 0.005  # 3-bit post-training quantization is not ...
    assert results[3, 3] >= fp32 - 0.005  # ... and QAT brings it back


def test_digits_qat_round_trips_bit_exact_through_the_artifact(digits, tmp_path):
    model, task = digits
    qat = QAT(weight_bits=4, epochs=1, progress=False).apply(model, task)
    loaded = load(save(qat, tmp_path / "qat.cml"))
    assert repr(loaded) == repr(qat)
    assert isinstance(loaded.features.bn1, nn.Identity)
    a, b = qat.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    x = task.example_input()
    assert torch.equal(loaded(x), qat(x))
