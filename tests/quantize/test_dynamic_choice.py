"""``Dynamic(per_tensor="auto")``: per-tensor layers chosen from calibration data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compactml.config import history
from compactml.errors import CompactMLError
from compactml.quantize import Dynamic, DynamicQuantLinear, quantize
from compactml.quantize import dynamic_choice as choice
from compactml.task import Task
from compactml.techniques import technique_from_dict


class SharedAndSpread(nn.Module):
    """``a`` and ``b`` read the same tensor of 0/1 features, which per-token and per-tensor
    quantization both represent exactly (so per tensor costs nothing there). ``c`` reads the
    same features with every other token scaled by 1e-3: one scale for the whole tensor rounds
    those tokens to zero, and the per-token normalization of ``c``'s output makes that loss
    visible in the model's output. ``c`` runs first, so choosing in model order would fail;
    ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)
        self.c = nn.Linear(16, 8, bias=False)
        self.unused = nn.Linear(16, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(x.shape[1], 1)
        scale[1::2] = 1e-3
        spread = F.normalize(self.c(x * scale), dim=-1)
        return self.drop(self.a(x) + self.b(x) + spread)


def binary_batches(count: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        x = (torch.rand(3, 6, 16, generator=gen) > 0.5).float()
        x[..., 0] = 1.0  # every token's largest value is 1
        batches.append(x)
    return batches


def test_auto_puts_the_shared_harmless_input_per_tensor_and_keeps_the_spread_one_per_token():
    torch.manual_seed(0)
    model = SharedAndSpread().train()  # the choice runs in eval mode; flags come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = Task(calib=binary_batches())
    q = quantize(model, Dynamic(per_tensor="auto", progress=False), task)
    assert (q.a.activation, q.b.activation, q.c.activation) == ("tensor", "tensor", "token")
    assert q.unused.activation == "token"  # never ran: nothing measured, left per token
    entry = history(q)[-1]
    assert entry["per_tensor"] == ["a", "b"]
    selection = entry["selection"]
    assert selection["groups"] == 2 and selection["groups_per_tensor"] == 1  # a and b together
    assert selection["left_per_token"] == ["unused"]
    assert selection["output_error"] <= selection["output_error_per_token"] * 1.1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.a) is nn.Linear and model.training and model.drop.training
    assert q.training and q.drop.training
    assert not any(m._forward_hooks for m in q.modules())  # the cost hooks are gone
    q.eval(), model.eval()
    # what was rejected really is worse: c per tensor multiplies the output error
    worse = quantize(model, Dynamic(per_tensor=("a", "b", "c")))
    x = binary_batches(1)[0]
    ref = model(x)
    assert (worse(x) - ref).norm() > 10 * (q(x) - ref).norm()


def test_a_large_tolerance_takes_every_layer_and_zero_keeps_them_per_token():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    # tokens of very different sizes: per tensor always costs something here
    task = Task(calib=[torch.randn(4, 5, 16) * torch.rand(4, 5, 1) * 10 for _ in range(2)])
    loose = quantize(mlp, Dynamic(per_tensor="auto", tolerance=100, progress=False), task)
    assert [loose[0].activation, loose[2].activation] == ["tensor", "tensor"]
    assert history(loose)[-1]["selection"]["candidates_evaluated"] == 2  # none and all
    # one layer whose tokens span three orders of magnitude: per tensor is clearly worse
    layer = nn.Linear(16, 8).eval()
    spread = Task(calib=[torch.randn(4, 5, 16) * 10 ** (3 * torch.rand(4, 5, 1)) for _ in "ab"])
    strict = quantize(layer, Dynamic(per_tensor="auto", tolerance=0, progress=False), spread)
    assert strict.activation == "token" and history(strict)[-1]["per_tensor"] == []
    x = torch.randn(2, 5, 16)
    assert torch.equal(strict(x), quantize(layer, Dynamic())(x))


def test_auto_needs_calibration_data_and_checks_its_options():
    model = SharedAndSpread().eval()
    for task in (None, Task(eval=[])):
        with pytest.raises(CompactMLError, match=r"per_tensor='auto'\) chooses layers from"):
            quantize(model, Dynamic(per_tensor="auto"), task)
    with pytest.raises(CompactMLError, match="cannot run the model on the calibration batch"):
        quantize(model, Dynamic(per_tensor="auto", progress=False), Task(calib=[torch.ones(2, 3)]))
    for bad in (-0.1, "0.1", True, float("nan")):
        with pytest.raises(CompactMLError, match="tolerance must be a number from 0 to 100"):
            Dynamic(per_tensor="auto", tolerance=bad)
    for options in ({"tolerance": 0.2}, {"calib_batches": 2}):
        with pytest.raises(CompactMLError, match="apply only with per_tensor='auto'"):
            Dynamic(per_tensor=("a",), **options)
    with pytest.raises(CompactMLError, match="calib data is empty"):
        quantize(model, Dynamic(per_tensor="auto"), Task(calib=[]))
    with pytest.raises(CompactMLError, match="calib_batches"):
        Dynamic(per_tensor="auto", calib_batches=0)
    config = technique_from_dict("dynamic", {"per_tensor": "auto", "tolerance": 0.2})
    assert config == Dynamic(per_tensor="auto", tolerance=0.2)
    assert config.per_tensor == "auto"


def test_auto_on_a_single_layer_model():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).eval()
    q = quantize(layer, Dynamic(per_tensor="auto", progress=False), Task(calib=binary_batches()))
    assert isinstance(q, DynamicQuantLinear) and q.activation == "tensor"  # exact both ways


def test_a_batch_does_not_group_with_the_next_one_and_non_finite_errors_are_refused():
    class Apart(nn.Module):  # a and b read x, but not one after the other
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.c(x * 2) + self.b(x)

    torch.manual_seed(0)
    x = binary_batches(1)[0]
    q = quantize(Apart().eval(), Dynamic(per_tensor="auto", progress=False), Task(calib=[x, x]))
    assert history(q)[-1]["selection"]["groups"] == 3  # b (end of one batch) and a (next) apart

    class Masked(nn.Module):  # logits masked with -inf: their error is NaN
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).masked_fill(torch.arange(4) == 0, float("-inf"))

    with pytest.raises(CompactMLError, match="output error of the per-token model .* not finite"):
        quantize(Masked().eval(), Dynamic(per_tensor="auto", progress=False), Task(calib=[x]))


#: Model output error added by each layer of a 10-layer stand-in when it is per tensor.
DELTAS = [1, 2, 12, -8, 1, 32, -2, 32, 32, -60]


class FakeScorer:
    """Stands in for OutputError: 1 + the sum of DELTAS / 64 of the layers now per tensor
    (exact in binary, not monotonic), counting its calls."""

    calls = 0

    def __init__(self, reference: nn.Module, task: Task, batches: int | None) -> None:
        self.describe = "fake error"

    def value(self, model: nn.Module) -> float:
        FakeScorer.calls += 1
        chosen = [
            int(n) for n, m in model.named_modules() if getattr(m, "activation", 0) == "tensor"
        ]
        return 1.0 + sum(DELTAS[i] for i in chosen) / 64


def test_bisection_then_one_by_one_extension_with_patience(monkeypatch):
    monkeypatch.setattr(choice, "OutputError", FakeScorer)
    monkeypatch.setattr(choice._Costs, "groups", lambda self: ([[str(i)] for i in range(10)], []))
    FakeScorer.calls = 0
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in DELTAS)).eval()
    config = Dynamic(per_tensor="auto", tolerance=0.125, progress=False)
    q = quantize(model, config, Task(calib=[torch.randn(2, 3, 4)]))
    # prefixes: 5 groups fit (1.125 = the limit), 6 do not; then layer 6 (-2/64) fits, 7 and 8
    # do not and the search stops (PATIENCE 2) before layer 9, which would have fitted
    selection = history(q)[-1]["selection"]
    assert [m.activation == "tensor" for m in q] == [True] * 5 + [False, True] + [False] * 3
    assert history(q)[-1]["per_tensor"] == ["0", "1", "2", "3", "4", "6"]
    assert selection["output_error"] == 1.0 + sum(DELTAS[:5] + [DELTAS[6]]) / 64
    assert selection["output_error"] == FakeScorer(None, None, None).value(q)
    assert selection["candidates_evaluated"] == FakeScorer.calls - 1 == 8  # base, 4, 3
    assert choice.PATIENCE == 2


def test_costs_sort_the_free_shared_group_before_the_costly_layer():
    torch.manual_seed(0)
    q = quantize(SharedAndSpread().eval(), Dynamic())
    layers = {n: m for n, m in q.named_modules() if isinstance(m, DynamicQuantLinear)}
    costs = choice._measure_costs(q, layers, Task(calib=binary_batches()), None, False)
    order, left = costs.groups()
    assert order == [["a", "b"], ["c"]] and left == ["unused"]
    assert abs(costs.cost("a")) < 1e-9 and costs.cost("c") > 1e-6
    assert costs.calls == {"a": 2, "b": 2, "c": 2, "unused": 0}  # two batches
