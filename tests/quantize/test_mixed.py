"""MixedPrecision: the knapsack solver, per-layer sensitivity, budgets and the recorded plan."""

from __future__ import annotations

import copy
import itertools
import math
import random
import re

import pytest
import torch
from torch import nn

from compactml.config import history
from compactml.errors import CompactMLError
from compactml.export.artifact import artifact_bytes
from compactml.quantize import MixedPrecision, WeightOnly, quantize
from compactml.quantize.mixed import parse_size, plan_mixed_precision
from compactml.quantize.modules import QuantConv2d, QuantLinear
from compactml.quantize.sensitivity import choose_bits, layer_sensitivity
from compactml.task import Task
from compactml.techniques import technique_from_dict


def brute_force(costs, losses, budget):
    """The least total loss over every assignment that fits, or None."""
    names = list(costs)
    best = None
    for combo in itertools.product(*(list(costs[n]) for n in names)):
        if sum(costs[n][b] for n, b in zip(names, combo, strict=True)) <= budget:
            loss = sum(losses[n][b] for n, b in zip(names, combo, strict=True))
            best = loss if best is None else min(best, loss)
    return best


def random_instance(rng: random.Random):
    costs, losses = {}, {}
    for i in range(rng.randint(1, 5)):
        options = rng.sample([2, 3, 4, 6, 8], rng.randint(1, 3))
        costs[f"l{i}"] = {b: rng.randint(0, 30) for b in options}
        losses[f"l{i}"] = {b: rng.choice([0.0, rng.random()]) for b in options}
    low = sum(min(c.values()) for c in costs.values())
    high = sum(max(c.values()) for c in costs.values())
    return costs, losses, rng.randint(low, high + 2)


def total(table, choice):
    return sum(table[name][bits] for name, bits in choice.items())


def test_choose_bits_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        costs, losses, budget = random_instance(rng)
        choice = choose_bits(costs, losses, budget)
        assert set(choice) == set(costs)
        assert total(costs, choice) <= budget
        assert total(losses, choice) == pytest.approx(brute_force(costs, losses, budget))


def _key(table, choice):
    """(number of infinite terms, sum of the finite ones): how choose_bits ranks totals."""
    values = [table[name][bits] for name, bits in choice.items()]
    return sum(not math.isfinite(v) for v in values), sum(v for v in values if math.isfinite(v))


def test_choose_bits_with_infinite_losses_matches_brute_force():
    rng = random.Random(2)
    for _ in range(300):
        costs, losses, budget = random_instance(rng)
        for name in losses:  # some options, and sometimes a whole layer, infinitely damaging
            always = rng.random() < 0.2
            for b in losses[name]:
                if always or rng.random() < 0.3:
                    losses[name][b] = rng.choice([math.inf, math.nan])
        choice = choose_bits(costs, losses, budget)
        assert total(costs, choice) <= budget
        fits = [
            dict(zip(costs, combo, strict=True))
            for combo in itertools.product(*(list(costs[n]) for n in costs))
            if sum(costs[n][b] for n, b in zip(costs, combo, strict=True)) <= budget
        ]
        best = min(_key(losses, c) for c in fits)
        assert _key(losses, choice)[0] == best[0]
        assert _key(losses, choice)[1] == pytest.approx(best[1])


def test_a_layer_infinite_at_every_option_does_not_starve_the_others():
    costs = {"a": {8: 8, 4: 4, 2: 2}, "b": {8: 8, 4: 4, 2: 2}}
    losses = {"a": dict.fromkeys((8, 4, 2), math.inf), "b": {8: 0.0, 4: 1.0, 2: 100.0}}
    assert choose_bits(costs, losses, budget=100)["b"] == 8
    assert choose_bits(costs, losses, budget=6) == {"a": 2, "b": 4}


def test_choose_bits_with_coarse_steps_still_fits():
    rng = random.Random(1)
    for _ in range(100):
        costs, losses, budget = random_instance(rng)
        choice = choose_bits(costs, losses, budget, max_steps=3)
        assert total(costs, choice) <= budget
        assert total(losses, choice) >= brute_force(costs, losses, budget) - 1e-12


def test_choose_bits_prefers_more_bits_on_ties_and_rejects_infeasible():
    costs = {"a": {8: 10, 4: 5, 2: 1}}
    assert choose_bits(costs, {"a": {8: 0.0, 4: 0.0, 2: 0.5}}, 10) == {"a": 8}
    assert choose_bits(costs, {"a": {8: 0.0, 4: 0.0, 2: 0.5}}, 9) == {"a": 4}
    with pytest.raises(CompactMLError, match="below the smallest total cost 1"):
        choose_bits(costs, {"a": {8: 0.0, 4: 0.0, 2: 0.0}}, 0)


def test_parse_size():
    assert parse_size("256KB") == 256 * 1024
    assert parse_size("1.5MB") == 1_572_864
    assert parse_size(" 2 kib ") == 2048
    assert parse_size(1000) == parse_size("1000") == parse_size("1000B") == 1000
    for bad in ("abc", "5TB", -3, 0, True, "1.5.2MB", None):
        with pytest.raises(CompactMLError, match="is not a size"):
            parse_size(bad)


def test_config_validation():
    for kwargs in ({}, {"size": "1KB", "avg_bits": 4}):
        with pytest.raises(CompactMLError, match="exactly one budget"):
            MixedPrecision(**kwargs)
    with pytest.raises(CompactMLError, match="candidates must be bit widths"):
        MixedPrecision(avg_bits=4, candidates=(8, 1))
    with pytest.raises(CompactMLError, match="avg_bits must be a positive number"):
        MixedPrecision(avg_bits=0)
    with pytest.raises(CompactMLError, match="group_size=24"):
        MixedPrecision(avg_bits=4, group_size=24)
    with pytest.raises(CompactMLError, match="metric='best'"):
        MixedPrecision(avg_bits=4, metric="best")
    with pytest.raises(CompactMLError, match="batches must be"):
        MixedPrecision(avg_bits=4, batches=0)
    config = technique_from_dict("mixed_precision", {"candidates": [2, 8, 4], "size": "2KB"})
    assert config.candidates == (8, 4, 2) and config.params()["candidates"] == [8, 4, 2]


class TwoBranch(nn.Module):
    """``big(x) + small(x)``: the branch with larger weights dominates the output error."""

    def __init__(self, big_scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.big, self.small = nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            self.big.weight.mul_(big_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.big(x) + self.small(x)


def calib_task() -> Task:
    gen = torch.Generator().manual_seed(0)
    return Task(calib=[torch.randn(32, 64, generator=gen) for _ in range(2)])


@pytest.mark.parametrize("scale", [10.0, 0.1])
def test_sensitive_layer_gets_more_bits(scale):
    model = TwoBranch(scale)
    # One layer at 8 bits and one at 2 (per-channel scales): 33,792 + 9,216 stored bits.
    config = MixedPrecision(candidates=(8, 2), avg_bits=5.3, group_size=None, progress=False)
    quantized = config.apply(model, calib_task())
    sensitive, robust = ("big", "small") if scale > 1 else ("small", "big")
    assert getattr(quantized, sensitive).scheme.bits == 8
    assert getattr(quantized, robust).scheme.bits == 2
    plan = plan_mixed_precision(model, calib_task(), config)
    assert plan.bits() == {"big": quantized.big.scheme.bits, "small": quantized.small.scheme.bits}
    assert plan.avg_bits <= 5.3
    options = {layer.name: layer.options for layer in plan.layers}
    assert options[sensitive][2] > 10 * options[robust][2]


def test_size_budget_met_by_the_artifact_and_input_untouched(factory):
    model = factory("conv")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = Task(calib=[torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))])
    fp32 = len(artifact_bytes(model))
    all_two = len(artifact_bytes(quantize(model, WeightOnly(bits=2, group_size=None))))
    for fraction in (0.2, 0.3, 0.45):
        size = int(fraction * fp32)
        config = MixedPrecision(size=size, group_size=None, progress=False)
        quantized = quantize(model, config, task)
        assert all_two <= len(artifact_bytes(quantized)) <= size
        layers = [quantized.conv1, quantized.conv2, quantized.conv3, quantized.fc]
        assert all(isinstance(m, QuantConv2d | QuantLinear) for m in layers)
    tight = MixedPrecision(size=int(0.2 * fp32), group_size=None, progress=False)
    loose = MixedPrecision(size=int(0.45 * fp32), group_size=None, progress=False)
    bits = [plan_mixed_precision(model, task, c).bits() for c in (tight, loose)]
    assert sum(bits[0].values()) < sum(bits[1].values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert history(model) == []


def test_plan_recorded_in_history(factory):
    model = factory("conv")
    task = Task(calib=[torch.randn(4, 1, 8, 8)])
    config = MixedPrecision(avg_bits=4, group_size=None, progress=False)
    quantized = config.apply(model, task)
    (entry,) = history(quantized)
    assert entry["technique"] == "MixedPrecision"
    assert entry["changed"] == ["conv1", "conv2", "conv3", "fc"]
    rows = entry["plan"]["layers"]
    assert [row["layer"] for row in rows] == entry["changed"]
    for row in rows:
        layer = quantized.get_submodule(row["layer"])
        assert row["bits"] == layer.scheme.bits and row["bytes"] == layer.storage_bytes()
    assert "output error" in entry["plan"]["measure"]
    weights = sum(math.prod(quantized.get_submodule(r["layer"]).weight_shape) for r in rows)
    stored = sum(quantized.get_submodule(r["layer"]).qweight_data().storage_bytes() for r in rows)
    assert 8 * stored <= 4 * weights
    with pytest.raises(CompactMLError, match="needs data"):
        config.apply(model)


def test_infeasible_size_names_the_minimum(factory):
    model = factory("conv")
    task = Task(calib=[torch.randn(4, 1, 8, 8)])
    config = MixedPrecision(size=1000, group_size=None, progress=False)
    with pytest.raises(CompactMLError, match="too small") as info:
        config.apply(model, task)
    minimum = int(re.search(r"is (\d+) bytes", str(info.value)).group(1))
    fitted = MixedPrecision(size=minimum, group_size=None, progress=False).apply(model, task)
    assert len(artifact_bytes(fitted)) <= minimum
    assert {m.scheme.bits for m in fitted.modules() if hasattr(m, "scheme")} == {2}
    with pytest.raises(CompactMLError, match=r"avg_bits=1 is too small: .* is 2\.\d+"):
        MixedPrecision(avg_bits=1, group_size=None, progress=False).apply(model, task)


def test_unquantizable_layers_stay_float_and_count_in_size(factory):
    model = factory("conv")  # conv1's rows hold 9 weights: no group of 16 fits
    task = Task(calib=[torch.randn(4, 1, 8, 8)])
    config = MixedPrecision(size="8KB", group_size=16, progress=False)
    with pytest.warns(UserWarning, match="kept 1 layer"):
        quantized = config.apply(model, task)
    assert type(quantized.conv1) is nn.Conv2d
    assert len(artifact_bytes(quantized)) <= 8 * 1024
    assert list(history(quantized)[0]["skipped"]) == ["conv1"]


def test_layer_sensitivity_metric_and_failures():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(64, 8)
    labels = model(x).argmax(1)  # the float model scores 100%
    task = Task(eval=[(x[:32], labels[:32]), (x[32:], labels[32:])], calib=[x])

    def zeroed(layer: nn.Module) -> nn.Module:
        new = copy.deepcopy(layer)
        nn.init.zeros_(new.weight)
        return new

    def refuse(layer: nn.Module) -> nn.Module:
        raise CompactMLError("cannot")

    variants = {"same": copy.deepcopy, "zero": zeroed, "refuse": refuse}
    sens = layer_sensitivity(model, task, ["0", "2"], variants, progress=False)
    assert sens.measure == "top1 drop on 8 eval batches" and sens.baseline == 1.0
    assert sens.damage["0"]["same"] == 0.0 and sens.damage["2"]["zero"] > 0.5
    assert "refuse" not in sens.damage["0"] and sens.failed["2"]["refuse"] == "cannot"
    out = layer_sensitivity(model, task, ["2"], variants, measure="output", progress=False)
    assert out.damage["2"]["same"] == 0.0 and out.damage["2"]["zero"] > 0.1
    assert torch.equal(model(x).argmax(1), labels)  # the model was not changed
    with pytest.raises(CompactMLError, match="needs calibration inputs"):
        layer_sensitivity(model, Task(eval=task.eval), ["0"], variants, measure="output")
