"""Per-layer sensitivity: how much one layer's compression alone damages the model.

``layer_sensitivity(model, task, layers, variants)`` is technique-agnostic: a *variant* is any
function that takes a float layer and returns its compressed replacement (quantized at some bit
width, pruned to some sparsity, factorized to some rank) without modifying the layer it is
given. Each ``(layer, variant)`` pair is measured on its own: that one layer is swapped for the
variant's module in a working copy of the model, the damage is measured, and the original layer
is put back. Everything else stays in float, so the numbers say what *this* layer costs.

Damage is one of the two measures of :mod:`compactml.sensitivity.measures` (``measure="auto"``,
``"metric"`` or ``"output"``): the drop of the task's headline metric on a few eval batches, or
the relative squared error of the final outputs against the float model's on calibration
batches. For small perturbations the output errors of independent layers add in squared norm,
which is what an additive planner assumes. Note the metric is measured on eval data, so a plan
tuned on it is scored on data it has seen; give the Task a separate eval split for a clean
final measurement. The working copy is the only model changed; the input model is never
touched. (:func:`compactml.sensitivity.sensitivity` is the same scan driven by a whole
technique config instead of per-layer variant functions.)

``choose_bits(costs, losses, budget)`` then allocates a budget across layers: one option per
layer (a bit width, a sparsity) with the least summed damage whose summed cost fits.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from compactml.errors import CompactMLError
from compactml.progress import progress_bar
from compactml.quantize.swap import set_layer
from compactml.sensitivity.measures import make_scorer
from compactml.task import Task

#: A function from a float layer to its compressed replacement (the layer is left unchanged).
Variant = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Sensitivity:
    """The result of :func:`layer_sensitivity`.

    Attributes:
        damage: layer name -> variant name -> damage (0 means no measurable harm; larger is
            worse; ``inf`` when the model's outputs became non-finite).
        failed: layer name -> variant name -> reason, for variants that could not be built
            for that layer (they raised a CompactMLError).
        measure: what a damage number is, e.g. ``"top1 drop on 3 eval batches"``.
        baseline: the float model's value of that measure (the metric; 0.0 for output error).
    """

    damage: dict[str, dict[str, float]]
    failed: dict[str, dict[str, str]]
    measure: str
    baseline: float


def choose_bits(
    costs: Mapping[str, Mapping[int, int]],
    losses: Mapping[str, Mapping[int, float]],
    budget: int,
    max_steps: int = 20_000,
) -> dict[str, int]:
    """The option per layer with the least total loss whose total cost is at most ``budget``.

    A multiple-choice knapsack solved by dynamic programming: ``costs[layer][option]`` are
    non-negative integers (bytes, or bits), ``losses[layer][option]`` the predicted damage
    (summed over layers). Options are bit widths for mixed precision, but any sortable keys
    work (sparsities, ranks). Exact when the budget's slack above the cheapest choice is at most
    ``max_steps`` cost units; above that, costs are rounded *up* to units of
    ``ceil(slack / max_steps)``, so the answer always fits the budget and is near-optimal. On
    equal loss the costlier option (more bits) wins. NaN losses count as infinite; totals are
    compared first by their number of infinite terms, then by the sum of the finite ones, so a
    layer that is infinite at every option does not stop the others from being chosen well.
    """
    if set(costs) != set(losses) or any(set(costs[n]) != set(losses[n]) for n in costs):
        raise CompactMLError("costs and losses must name the same layers and options")
    if any(not costs[n] for n in costs):
        raise CompactMLError("every layer needs at least one option; drop layers without any")
    names = list(costs)
    floor = {n: min(costs[n].values()) for n in names}
    slack = int(budget) - sum(floor.values())
    if slack < 0:
        raise CompactMLError(
            f"budget {budget} is below the smallest total cost {sum(floor.values())}; "
            "raise the budget"
        )
    unit = max(1, math.ceil(slack / max_steps))
    steps = slack // unit
    # best[j] = (infinite terms, finite loss) of the layers so far with extra cost <= j,
    # compared in that order: one layer that is infinite at every option must not make the
    # others' choices irrelevant (inf + anything = inf).
    best_inf, best = np.zeros(steps + 1), np.zeros(steps + 1)
    options, extra, picks = [], [], []
    for name in names:
        opts = sorted(costs[name], key=lambda b: (costs[name][b], b), reverse=True)
        ext = [math.ceil((costs[name][b] - floor[name]) / unit) for b in opts]
        new_inf, new = np.full(steps + 1, np.inf), np.full(steps + 1, np.inf)
        arg = np.full(steps + 1, len(opts) - 1)
        for k, (b, c) in enumerate(zip(opts, ext, strict=True)):
            if c > steps:
                continue
            loss = float(losses[name][b])
            infinite = not math.isfinite(loss)
            cand_inf, cand = np.full(steps + 1, np.inf), np.full(steps + 1, np.inf)
            cand_inf[c:] = best_inf[: steps + 1 - c] + infinite
            cand[c:] = best[: steps + 1 - c] + (0.0 if infinite else loss)
            better = (cand_inf < new_inf) | ((cand_inf == new_inf) & (cand < new))
            new_inf[better], new[better], arg[better] = cand_inf[better], cand[better], k
        best_inf, best = new_inf, new
        options.append(opts), extra.append(ext), picks.append(arg)
    chosen, j = {}, steps
    for i in reversed(range(len(names))):
        k = int(picks[i][j])
        chosen[names[i]] = options[i][k]
        j -= extra[i][k]
    return {name: chosen[name] for name in names}


def layer_sensitivity(
    model: nn.Module,
    task: Task | None,
    layers: Sequence[str],
    variants: Mapping[str, Variant],
    *,
    measure: str = "auto",
    batches: int | None = 8,
    progress: bool = True,
) -> Sensitivity:
    """Damage of each variant of each layer, measured one ``(layer, variant)`` at a time.

    Args:
        model: the float model (not modified: the measurement runs on a deep copy).
        task: the data (eval batches and a metric, or calib batches).
        layers: module names in ``model`` to measure (``""`` is the model itself).
        variants: variant name -> function building the compressed replacement of a layer.
        measure: ``"auto"``, ``"metric"`` or ``"output"`` (see the module docstring).
        batches: how many batches each measurement runs on (None: all of them).
        progress: show a progress bar over the ``len(layers) * len(variants)`` measurements.
    """
    work = copy.deepcopy(model)
    scorer = make_scorer(work, task, measure, batches)
    damage: dict[str, dict[str, float]] = {name: {} for name in layers}
    failed: dict[str, dict[str, str]] = {}
    pairs = [(layer, variant) for layer in layers for variant in variants]
    for layer, variant in progress_bar(pairs, "Layer sensitivity", len(pairs), progress):
        original = work.get_submodule(layer)
        try:
            new = variants[variant](original)
        except CompactMLError as exc:
            failed.setdefault(layer, {})[variant] = str(exc)
            continue
        damage[layer][variant] = scorer(set_layer(work, layer, new))
        set_layer(work, layer, original)
    return Sensitivity(damage, failed, scorer.describe, scorer.baseline)
