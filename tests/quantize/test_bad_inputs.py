"""Bad input to the quantization configs: layers a scheme cannot handle stay in float (warned
about and recorded), data problems are one-line errors naming the layer, and the input model
is never touched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from compactml.config import history
from compactml.errors import CompactMLError
from compactml.quantize import QAT, Dynamic, Half, Static, WeightOnly, quantize
from compactml.quantize.affine import FloatScheme, PerChannel, QScheme
from compactml.quantize.dynamic import DynamicQuantLinear
from compactml.quantize.modules import QuantLinear
from compactml.quantize.observers import EntropyObserver, MSEObserver, coarsen, kl_threshold_bin
from compactml.quantize.qweight import QWeight
from compactml.task import Task


class Branchy(nn.Module):
    """``c`` runs only on batches of one sample; ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.b = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if x.shape[0] == 1:
            h = self.c(h)
        return self.b(h)


def _net(scale_first: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        net[0].weight.mul_(scale_first)
    return net


def _calib() -> list[torch.Tensor]:
    return [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.mark.parametrize(
    "config",
    [Dynamic(), Static(progress=False), WeightOnly(bits=4, group_size=None)],
    ids=["dynamic", "static", "weight_only"],
)
def test_a_layer_too_large_for_float16_scales_stays_float(config):
    model = _net(scale_first=1e8)
    before = model[0].weight.clone()
    with pytest.warns(UserWarning, match="kept 1 layer.*0: weights are too large"):
        q = quantize(model, config, Task(calib=_calib()))
    assert type(q[0]) is nn.Linear and type(q[2]) is not nn.Linear
    entry = history(q)[-1]
    assert "0" in entry["skipped"] and "2" in entry["changed"]
    assert "exclude the layer" in entry["skipped"]["0"]
    assert "scale_dtype" not in entry["skipped"]["0"]
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("config", [Dynamic(), WeightOnly(bits=4, group_size=None), Half()])
def test_a_weight_with_nan_stays_float_and_a_single_layer_is_an_error(config):
    model = _net()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.warns(UserWarning, match="0: the weight has NaN or inf"):
        q = quantize(model, config)
    assert type(q[0]) is nn.Linear and "0" in history(q)[-1]["skipped"]
    with pytest.raises(CompactMLError, match="no selected layer .* 0: the weight has NaN"):
        quantize(nn.Sequential(model[0]), config)
    with pytest.raises(CompactMLError, match="NaN or inf"):
        QWeight.from_float(torch.tensor([[1.0, math.inf]]), QScheme(8, True, PerChannel(0)))


def test_half_weight_never_aliases_the_float_module():
    lin = nn.Linear(16, 16).half()
    layer = QuantLinear.from_float(lin, FloatScheme("float16"))
    assert layer.qweight.data_ptr() != lin.weight.data_ptr()
    with torch.no_grad():
        layer.qweight.zero_()
    assert bool(lin.weight.abs().sum() > 0)


def test_dynamic_copies_the_bias_and_wants_an_int_bits():
    lin = nn.Linear(8, 4)
    layer = DynamicQuantLinear.from_float(lin)
    assert torch.equal(layer.bias, lin.bias) and layer.bias.data_ptr() != lin.bias.data_ptr()
    with pytest.raises(CompactMLError, match="bits=8.0"):
        Dynamic(bits=8.0)


def test_static_names_a_layer_that_calibration_never_reaches():
    task = Task(calib=[torch.randn(4, 8)], example=torch.randn(1, 8))
    with pytest.raises(CompactMLError, match="never reached c input"):
        quantize(Branchy().eval(), Static(progress=False, exclude=("unused",)), task)


@pytest.mark.parametrize("config", [QAT(epochs=0, progress=False), Static(progress=False)])
def test_nan_activation_during_calibration_names_the_layer(config):
    bad = torch.randn(4, 8)
    bad[0, 0] = math.nan
    task = Task(calib=[bad, torch.randn(4, 8)], train=[(torch.randn(4, 8), torch.zeros(4))])
    with pytest.raises(CompactMLError, match="NaN or inf at the a input of layer 'a'"):
        quantize(Branchy().eval(), config, task)


def test_qat_keeps_layers_calibration_never_reaches_in_float():
    model = Branchy().eval()
    task = Task(calib=[torch.randn(4, 8)], train=[(torch.randn(4, 8), torch.zeros(4).long())])
    with pytest.warns(UserWarning, match=r"QAT kept 2 layer\(s\) in float: c: .*unused: "):
        q = quantize(model, QAT(epochs=0, progress=False), task)
    assert type(q.c) is nn.Linear and type(q.unused) is nn.Linear
    assert isinstance(q.a, QuantLinear) and q.a.input_quant is not None
    assert set(history(q)[-1]["skipped"]) == {"c", "unused"}
    assert type(model.a) is nn.Linear  # the input model is untouched


@pytest.mark.parametrize(
    "make",
    [
        lambda: Static(observer="minmax", percentile=500.0),
        lambda: Static(observer="entropy", percentile=-3),
        lambda: QAT(lr=math.inf),
        lambda: QAT(lr=math.nan),
        lambda: MSEObserver(steps=0),
        lambda: MSEObserver(steps=2.5),
        lambda: MSEObserver(min_ratio=0.0),
        lambda: MSEObserver(min_ratio=1.5),
    ],
)
def test_invalid_settings_are_rejected(make):
    with pytest.raises(CompactMLError):
        make()


def _kl_reference(counts: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) for the first ``i`` bins, written with loops (TensorRT's recipe, with the
    non-empty mask taken from P after the outliers are folded in)."""
    p = [float(c) for c in counts[:i]]
    p[-1] += float(sum(counts[i:]))
    starts = [(k * i) // levels for k in range(levels)] + [i]
    q = [0.0] * i
    for k in range(levels):
        chunk = range(starts[k], starts[k + 1])
        filled = [j for j in chunk if p[j] > 0]
        for j in filled:
            q[j] = sum(counts[j2] for j2 in chunk) / len(filled)
    sp, sq = sum(p), sum(q)
    if sq <= 0:
        return math.inf
    return sum(
        (pj / sp) * math.log((pj / sp) / max(qj / sq, 1e-12))
        for pj, qj in zip(p, q, strict=True)
        if pj > 0
    )


def test_kl_threshold_matches_the_reference_on_sparse_histograms():
    rng = np.random.default_rng(0)
    for _ in range(30):
        counts = rng.integers(0, 5, 24) * (rng.random(24) < 0.5)
        counts[-1] += 1
        levels = 4
        kls = {i: _kl_reference(counts, i, levels) for i in range(levels, len(counts) + 1)}
        assert kl_threshold_bin(counts, levels) == min(kls, key=lambda i: (kls[i], i))


def test_entropy_stride_keeps_the_largest_values():
    counts = np.arange(10, dtype=np.float64)
    coarse = coarsen(counts, 4)
    assert coarse.tolist() == [6.0, 22.0, 17.0]
    obs = EntropyObserver(bins=16, stride=5)
    obs.observe(torch.cat([torch.zeros(100), torch.full((1000,), 1.0)]))
    assert obs.clip_range()[1] == pytest.approx(1.0)  # the mass at the top is not dropped
