"""SmoothQuant: the scale math, exact smoothing of the float model, and W8A8 against Static."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from torch import nn

from compactml.config import history
from compactml.errors import CompactMLError
from compactml.export.artifact import load, save
from compactml.quantize import QuantLinear, Static, quantize
from compactml.quantize.act import act_qparams
from compactml.quantize.fold import ScaledInput
from compactml.quantize.smoothquant import SmoothQuant, smooth_scales
from compactml.source import load_factory
from compactml.task import Task, primary_output, split_batch
from compactml.techniques import technique_from_dict

from ..calib.conftest import tiny_bert, tiny_llama, token_task
from .test_quant_artifact import assert_same_state

pytest.importorskip("transformers")

# Pre-norm residual blocks whose LayerNorm gains have three 50x channels: fc1 reads strong
# activation outliers (folded into the norm), fc2 reads a ReLU output (an explicit scale).
FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, 2 * width)
            self.fc2 = nn.Linear(2 * width, width)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


    class Net(nn.Module):
        def __init__(self, width=32, depth=2):
            super().__init__()
            self.inp = nn.Linear(16, width)
            self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
            self.head = nn.Linear(width, 8)

        def forward(self, x):
            h = self.inp(x)
            for block in self.blocks:
                h = block(h)
            return self.head(h)


    def outliers():
        torch.manual_seed(0)
        net = Net().eval()
        with torch.no_grad():
            for block in net.blocks:
                block.norm.weight[:3] *= 50
        return net
    """
)


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "sqnets.py"
    path.write_text(FACTORY)
    return load_factory(f"{path}:outliers")[0]


def _task(batches: int = 3) -> Task:
    gen = torch.Generator().manual_seed(0)
    return Task(calib=[torch.randn(4, 6, 16, generator=gen) for _ in range(batches)])


def _outlier_llama() -> nn.Module:
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 50
            layer.post_attention_layernorm.weight[:3] *= 50
    return model


def _error(reference: nn.Module, other: nn.Module, task: Task) -> float:
    """Summed relative output error over the calibration batches."""
    total = 0.0
    with torch.no_grad():
        for batch in task.batches("calib"):
            inputs = split_batch(batch)[0]
            a = primary_output(task.run(reference, inputs))
            b = primary_output(task.run(other, inputs))
            total += float((a - b).norm() / a.norm())
    return total


def test_smooth_scales_match_hand_values():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0, 16.0])
    weight = torch.tensor([1.0, 4.0, 2.0, 0.0, 4.0])
    # sqrt(4 / 1), sqrt(1 / 4); a channel that never fires or that no weight reads keeps 1
    half = smooth_scales(act, weight, 0.5)
    assert torch.allclose(half, torch.tensor([2.0, 0.5, 1.0, 1.0, 2.0]))
    live = torch.tensor([0, 1, 4])
    # alpha = 0.5 equalizes the two maxima: max|X_j / s_j| == max|W_j * s_j|
    assert torch.allclose(act[live] / half[live], weight[live] * half[live])
    assert torch.allclose(smooth_scales(act, weight, 1.0), torch.tensor([4.0, 1, 1, 1, 16]))
    assert torch.allclose(smooth_scales(act, weight, 0.0), torch.tensor([1.0, 0.25, 1, 1, 0.25]))
    assert torch.allclose(
        smooth_scales(act, weight, 0.25)[live], act[live] ** 0.25 / weight[live] ** 0.75
    )


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True, "0.5"])
def test_alpha_outside_zero_to_one_is_refused(alpha):
    with pytest.raises(CompactMLError, match="alpha"):
        SmoothQuant(alpha=alpha)
    with pytest.raises(CompactMLError, match="alpha"):
        smooth_scales(torch.ones(3), torch.ones(3), alpha)


def test_smooth_scales_refuse_bad_maxima():
    with pytest.raises(CompactMLError, match="one activation and one weight maximum"):
        smooth_scales(torch.ones(3), torch.ones(4), 0.5)
    with pytest.raises(CompactMLError, match="finite, non-negative"):
        smooth_scales(torch.tensor([1.0, float("nan")]), torch.ones(2), 0.5)


def test_smoothing_keeps_the_float_model_and_folds_where_it_can(net):
    task = _task()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    smoothed = SmoothQuant(progress=False).smooth(net, task)
    assert _error(net, smoothed, task) < 1e-5
    (entry,) = history(smoothed)
    kinds = {tuple(g["layers"]): (g["kind"], g["producer"]) for g in entry["smoothing"]["groups"]}
    assert kinds[("blocks.0.fc1",)] == ("norm", "blocks.0.norm")
    assert kinds[("blocks.1.fc2",)] == ("explicit", None)
    assert isinstance(smoothed.blocks[1].fc2, ScaledInput)
    # the outlier channels' activation range moved into fc1's weight columns
    gain = smoothed.blocks[0].norm.weight.detach().abs()
    assert gain[:3].max() < 0.2 * net.blocks[0].norm.weight.detach().abs()[:3].min()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # untouched


@pytest.mark.parametrize("name", ["outlier_net", "outlier_llama"])
def test_w8a8_error_is_lower_than_plain_static(net, name):
    if name == "outlier_net":  # the norm-fed layers, where the outliers are
        model, task, include, ratio = net, _task(), ("*.fc1",), 0.5
    else:
        model, task, include, ratio = _outlier_llama(), token_task(True, batches=3), ("*",), 0.85
    static = Static(progress=False, include=include).apply(model, task)
    smooth = quantize(model, SmoothQuant(progress=False, include=include), task)
    assert _error(model, smooth, task) < ratio * _error(model, static, task)
    # the same layers are quantized (an explicit scale holds its layer one level down)
    names = [n.removesuffix(".inner") for n, m in smooth.named_modules() if _quantized(m)]
    assert names == [n for n, m in static.named_modules() if _quantized(m)]


def _quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear) and module.input_quant is not None


def test_explicit_scale_is_quantized_after_the_division(net):
    task = _task()
    config = SmoothQuant(progress=False, include=("*.fc2",))
    smoothed, q = config.smooth(net, task), config.apply(net, task)
    seen = []
    hook = smoothed.blocks[0].fc2.inner.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for batch in task.batches("calib"):
            smoothed(batch)
    hook.remove()
    x = torch.cat(seen)
    layer = q.blocks[0].fc2  # the first quantized layer: float inputs up to it
    assert isinstance(layer, ScaledInput) and isinstance(layer.inner, QuantLinear)
    quant = layer.inner.input_quant
    # the observer saw exactly the smoothed input x / s (minmax), not the float input
    assert (float(quant.scale), int(quant.zero_point)) == act_qparams(
        float(x.min()), float(x.max())
    )
    raw = x / layer.inv_scale
    assert float(raw.max()) > 3 * float(x.max())


def test_history_is_one_entry_with_both_steps(net):
    q = SmoothQuant(alpha=0.7, progress=False).apply(net, _task())
    (entry,) = history(q)
    assert entry["technique"] == "SmoothQuant" and entry["params"]["alpha"] == 0.7
    assert "blocks.0.fc1" in entry["changed"] and "blocks.1.fc2.inner" in entry["changed"]
    assert entry["smoothing"]["calib_batches"] == 3 and len(entry["smoothing"]["groups"]) == 6
    assert entry["static"]["activation_scales"] > 0


def test_bad_input_is_refused_and_the_model_untouched(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    config = SmoothQuant(progress=False)
    with pytest.raises(CompactMLError, match="needs calibration data"):
        config.apply(net, None)
    with pytest.raises(CompactMLError, match="needs calibration data"):
        config.apply(net, Task(eval=[]))
    with pytest.raises(CompactMLError, match="calib data is empty"):
        config.apply(net, Task(calib=[]))
    with pytest.raises(CompactMLError, match="no Linear layer"):
        SmoothQuant(include=("nothing",)).apply(net, _task())
    with pytest.raises(CompactMLError, match="no Linear layer"):
        SmoothQuant().apply(nn.Sequential(nn.ReLU()), _task())
    with pytest.raises(CompactMLError, match="unknown observer"):
        SmoothQuant(observer="median")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_nan_statistics_leave_layers_unsmoothed_without_nan_weights(net):
    bad = Task(calib=[torch.full((2, 3, 16), float("nan"))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smoothed = SmoothQuant(progress=False).smooth(net, bad)
    assert any("unsmoothed" in str(w.message) and "blocks.0.fc1" in str(w.message) for w in caught)
    assert all(bool(torch.isfinite(v).all()) for v in smoothed.state_dict().values())
    assert_same_state(smoothed, net)  # nothing folded


def test_round_trip_through_the_artifact_is_bit_exact(net, tmp_path):
    task = _task()
    q = SmoothQuant(progress=False).apply(net, task)
    loaded = load(save(q, tmp_path / "sq.cml"), trust_factory=True)
    assert repr(loaded) == repr(q)
    assert_same_state(loaded, q)
    assert history(loaded) == history(q)
    x = task.example_input()
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_bert_smooths_and_quantizes_every_linear_layer():
    model, task = tiny_bert(), token_task(True, batches=2)
    q = SmoothQuant(progress=False).apply(model, task)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    names = [n.removesuffix(".inner") for n, m in q.named_modules() if _quantized(m)]
    assert names == linears
    assert _error(model, q, task) < 0.05


def test_recipe_name():
    assert technique_from_dict("smoothquant", {"alpha": 0.8}) == SmoothQuant(alpha=0.8)
