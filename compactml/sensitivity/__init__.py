"""Per-layer sensitivity of any technique: ``cml.sensitivity(model, task, technique, levels)``.

For every layer the technique touches and every level (bits, sparsity, ratio, ...), the
technique is applied to that one layer alone (its ``include`` narrowed to the layer) and the
model is measured; everything else stays as it was, so a number says what *this* layer costs at
*that* level. The curves show which layers tolerate strong compression and which must be spared,
the classic per-layer sensitivity scan of pruning (Han et al. 2015, "Learning both Weights and
Connections"; Li et al. 2017, "Pruning Filters for Efficient ConvNets") and of mixed precision
(HAWQ, Dong et al. 2019). Nothing here knows any technique: the layers come from the
technique's own record of what it changed (``compactml.config.history``), and the level is the
field the technique's class names in ``Technique.level``.

Damage is measured one of two ways (``measure``; :mod:`compactml.sensitivity.measures`): the
task's headline metric on a few eval batches (``"metric"``), or the relative error of the
model's outputs on calibration batches (``"output"``). The model given is never modified; the
result is a :class:`~compactml.sensitivity.table.SensitivityTable`.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compactml.config import Technique, history
from compactml.errors import CompactMLError
from compactml.progress import progress_bar
from compactml.sensitivity.measures import MEASURES, MetricDrop, OutputError, make_scorer
from compactml.sensitivity.table import SensitivityTable
from compactml.task import Task


def _check_levels(levels: Any) -> tuple[float, ...]:
    """``levels`` as a tuple of distinct finite Python numbers, or a one-line error (numpy
    arrays and scalars are accepted)."""
    items = None
    if isinstance(levels, Iterable) and not isinstance(levels, str | bytes | Mapping):
        items = [v.item() if hasattr(v, "item") else v for v in levels]
    ok = bool(items) and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in items
    )
    if not ok:
        raise CompactMLError(
            f"levels must be a non-empty list of numbers such as [8, 4, 2] or [0.5, 0.9], "
            f"got {levels!r}"
        )
    if len(set(items)) != len(items):
        raise CompactMLError(f"levels must be distinct, got {items}; remove the repeats")
    return tuple(items)


def _maker(technique: Any) -> tuple[Callable[[float], Technique], str]:
    """A function level -> Technique, and the level's name."""
    if isinstance(technique, Technique):
        field = type(technique).level
        if field is None:
            name = type(technique).__name__
            raise CompactMLError(
                f"{name} has no level to vary (its class sets no Technique.level); pass a "
                f"function instead, e.g. technique=lambda level: {name}(...)"
            )
        return (lambda level: dataclasses.replace(technique, **{field: level})), field
    if isinstance(technique, type) and issubclass(technique, Technique):
        raise CompactMLError(
            f"technique is the class {technique.__name__}; pass a config such as "
            f"{technique.__name__}() whose {technique.level or 'level'} is varied"
        )
    if callable(technique):
        return technique, "level"
    raise CompactMLError(
        f"technique must be a Technique such as WeightOnly(bits=4) or a function level -> "
        f"Technique, got {type(technique).__name__}"
    )


def _config_at(make: Callable[[float], Technique], level: float, level_name: str) -> Technique:
    """The technique at ``level``; an invalid level is the caller's error, raised up front."""
    try:
        config = make(level)
    except CompactMLError as exc:
        raise CompactMLError(f"{level_name}={level!r} is not valid: {exc}") from exc
    if not isinstance(config, Technique):
        raise CompactMLError(
            f"the technique function returned {type(config).__name__} for level {level!r}; "
            "it must return a Technique such as WeightOnly(bits=level)"
        )
    return config


def _weight_layer(module: nn.Module | None) -> bool:
    """Whether ``module`` holds a weight matrix or kernel of its own (a Linear, a convolution,
    an embedding): what a per-layer sensitivity measures."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2


def _discover(model: nn.Module, task: Task | None, config: Technique) -> list[str]:
    """The weight layers ``config`` changes when applied to the whole model, from its record.

    Modules a technique changes along the way (a BatchNorm that Static folds away, a ReLU it
    wraps with an activation quantizer, a norm AWQ scales) are left out: they cannot be
    compressed alone. When the record names no weight layer, every changed module is kept."""
    before = len(history(model))
    new = config.apply(model, task)
    records = history(new)
    name = type(config).__name__
    if len(records) <= before:
        raise CompactMLError(
            f"{name} did not record which layers it changed (compactml.config.record); "
            "pass layers=[...] to name them"
        )
    changed = records[-1]["changed"]
    if not changed:
        raise CompactMLError(
            f"{name} changed no layer of the model; check its include/exclude patterns "
            "or pass layers=[...]"
        )
    modules = dict(model.named_modules())
    weights = [name for name in changed if _weight_layer(modules.get(name))]
    return list(dict.fromkeys(weights or changed))


def _check_layers(model: nn.Module, layers: Any) -> list[str]:
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise CompactMLError(
            f"layers must be a non-empty list of module names, got {layers!r}; or leave it "
            "out to measure every layer the technique changes"
        )
    known = dict(model.named_modules())
    unknown = [name for name in layers if not isinstance(name, str) or name not in known]
    if unknown:
        raise CompactMLError(
            f"the model has no module named {unknown[0]!r}; use names from "
            "model.named_modules(), e.g. " + ", ".join(repr(n) for n in list(known)[1:4])
        )
    return list(dict.fromkeys(layers))


def _one_layer(
    model: nn.Module,
    task: Task | None,
    config: Technique,
    layer: str,
    scorer: MetricDrop | OutputError,
    caught: list[str],
) -> float:
    """The metric of ``model`` with ``config`` applied to ``layer`` alone; CompactMLError when
    the technique cannot compress it. Warnings are collected in ``caught``, not shown."""
    only = dataclasses.replace(config, include=(glob.escape(layer),))
    before = len(history(model))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        new = only.apply(model, task)
    caught.extend(str(w.message) for w in seen)
    records = history(new)
    if len(records) > before and records[-1]["skipped"] and not records[-1]["changed"]:
        skipped = records[-1]["skipped"]
        raise CompactMLError(skipped.get(layer) or next(iter(skipped.values())))
    return scorer.value(new)


def sensitivity(
    model: nn.Module,
    task: Task | None,
    technique: Technique | Callable[[float], Technique],
    levels: Sequence[float],
    *,
    layers: Sequence[str] | None = None,
    measure: str = "auto",
    batches: int | None = 8,
    progress: bool = True,
) -> SensitivityTable:
    """Measure, layer by layer, the task's metric with that layer alone compressed at each level.

    Args:
        model: the model to analyse (never modified: the technique works on copies).
        task: the data: eval batches and a metric, or calib batches (``measure="output"``);
            also passed to the technique's ``apply`` (calibration-based techniques need it).
        technique: a config whose class names its level field (``Technique.level``, e.g.
            ``WeightOnly(bits=4, group_size=32)`` varies ``bits``), re-made per level with
            ``dataclasses.replace``; or a function ``level -> Technique``.
        levels: the values of the level to try, e.g. ``[8, 4, 3, 2]`` or ``[0.5, 0.7, 0.9]``.
        layers: module names to measure; None measures every layer the technique changes when
            applied to the whole model at the first level (read from its recorded history).
        measure: ``"auto"``, ``"metric"`` or ``"output"`` (see the module docstring).
        batches: batches per measurement (None: all).
        progress: show a progress bar over the ``len(layers) * len(levels)`` measurements.

    Each layer is compressed by the technique with ``include`` narrowed to that layer (its
    ``exclude`` is kept). A layer the technique cannot compress at some level (it raises a
    CompactMLError, or records the layer as skipped) is listed in ``failures`` with the reason
    and the scan goes on; warnings from the per-layer runs are repeated once each at the end.
    """
    levels = _check_levels(levels)
    make, level_name = _maker(technique)
    configs = {level: _config_at(make, level, level_name) for level in levels}
    scorer = make_scorer(model, task, measure, batches)
    first = configs[levels[0]]
    names = _discover(model, task, first) if layers is None else _check_layers(model, layers)
    values: dict[str, dict[float, float]] = {name: {} for name in names}
    failures: dict[str, dict[float, str]] = {}
    caught: list[str] = []
    pairs = [(name, level) for name in names for level in levels]
    title = f"{type(first).__name__} sensitivity"
    for name, level in progress_bar(pairs, title, len(pairs), progress):
        try:
            values[name][level] = _one_layer(model, task, configs[level], name, scorer, caught)
        except CompactMLError as exc:
            failures.setdefault(name, {})[level] = str(exc)
    for message in dict.fromkeys(caught):
        warnings.warn(message, stacklevel=2)
    return SensitivityTable(
        technique=type(first).__name__,
        level_name=level_name,
        levels=levels,
        measure="output" if isinstance(scorer, OutputError) else "metric",
        metric=scorer.name,
        higher_is_better=scorer.higher,
        baseline=scorer.baseline,
        values=values,
        failures=failures,
        describe=scorer.describe,
    )


__all__ = ["MEASURES", "SensitivityTable", "sensitivity"]
