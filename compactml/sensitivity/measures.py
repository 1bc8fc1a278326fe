"""How much a compressed model differs from the original: the two measures of a sensitivity scan.

- ``"metric"`` (:class:`MetricDrop`): the task's headline metric (``compactml.evaluate.PRIMARY``:
  top-1 for classification, MRR for embeddings, perplexity for language models) on the first
  ``batches`` eval batches; a custom metric callable is scored whole and taken as
  higher-is-better. The damage is the drop (for perplexity, the rise) from the original model's
  value.
- ``"output"`` (:class:`OutputError`): the relative squared error of the model's final outputs
  against the original model's, ``sum ||y - y_ref||^2 / sum ||y_ref||^2`` over the first
  ``batches`` calibration batches (no labels needed); the damage is that error.

``"auto"`` picks ``"metric"`` when the task has eval data and a built-in metric, else
``"output"``. Shared by :func:`compactml.sensitivity.sensitivity` and
:func:`compactml.quantize.sensitivity.layer_sensitivity`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from compactml.errors import CompactMLError
from compactml.evaluate import PRIMARY, Metrics, evaluate
from compactml.task import Task, eval_mode, primary_output, split_batch

MEASURES = ("auto", "metric", "output")


def _device_of(model: nn.Module) -> torch.device | None:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return None


def _to(inputs: Any, device: torch.device | None) -> Any:
    if device is None:
        return inputs
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)


class MetricDrop:
    """Scores a model by the task's headline metric on the first ``batches`` eval batches.

    ``value(model)`` is the metric, ``damage(value)`` its drop from the ``baseline`` (the
    metric of the model given here), ``self(model)`` both at once.
    """

    def __init__(self, model: nn.Module, task: Task, batches: int | None) -> None:
        self.task, self.batches = task, batches
        self.higher = PRIMARY.get(task.kind, ("", "higher"))[1] == "higher"
        metrics = self._metrics(model)
        self.name = metrics.primary  # a custom metric's first key
        self.baseline = float(metrics.primary_value)
        where = "all" if batches is None else f"{batches}"
        self.describe = f"{self.name} drop on {where} eval batches"

    def _metrics(self, model: nn.Module) -> Metrics:
        return evaluate(model, self.task, limit=self.batches, noise_levels=())

    def value(self, model: nn.Module) -> float:
        """The headline metric of ``model``."""
        return float(self._metrics(model).primary_value)

    def damage(self, value: float) -> float:
        """How much worse ``value`` is than the baseline (``inf`` when not finite)."""
        if not math.isfinite(value):
            return math.inf
        return self.baseline - value if self.higher else value - self.baseline

    def __call__(self, model: nn.Module) -> float:
        return self.damage(self.value(model))


class OutputError:
    """Scores a model by the relative squared error of its final outputs against those of the
    model given here, on the first ``batches`` calibration batches (the baseline is 0)."""

    name = "output_error"
    higher = False
    baseline = 0.0

    def __init__(self, model: nn.Module, task: Task, batches: int | None) -> None:
        self.task = task
        device = _device_of(model)
        self.inputs = [_to(split_batch(b)[0], device) for b in task.batches("calib", batches)]
        if not self.inputs:
            raise CompactMLError(
                "the task's calib data has no batches; pass Task(calib=...) with at least one"
            )
        self.reference = [self._outputs(model, x) for x in self.inputs]
        self.norm = sum(float(y.pow(2).sum()) for y in self.reference) or 1.0
        self.describe = f"relative output error on {len(self.inputs)} calib batches"

    def _outputs(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        with eval_mode(model), torch.inference_mode():
            return primary_output(self.task.run(model, inputs)).float()

    def value(self, model: nn.Module) -> float:
        """The relative output error of ``model``."""
        error = 0.0
        for inputs, ref in zip(self.inputs, self.reference, strict=True):
            error += float((self._outputs(model, inputs) - ref).pow(2).sum())
        return error / self.norm

    def damage(self, value: float) -> float:
        """The error itself (``inf`` when not finite)."""
        return value if math.isfinite(value) else math.inf

    def __call__(self, model: nn.Module) -> float:
        return self.damage(self.value(model))


def resolve_measure(task: Task | None, measure: str) -> str:
    """``"metric"`` or ``"output"`` for ``measure`` (``"auto"`` looks at what the task has)."""
    if measure not in MEASURES:
        raise CompactMLError(f"measure={measure!r} is not supported; use one of {MEASURES}")
    if task is None:
        raise CompactMLError(
            "measuring layer sensitivity needs data; pass a Task with calib batches "
            "(or eval batches and a metric)"
        )
    if measure == "auto":
        metric_ready = task.kind in PRIMARY and task.has("eval")
        measure = "metric" if metric_ready else "output"
    if measure == "output" and not task.has("calib"):
        raise CompactMLError(
            "measuring output error needs calibration inputs; pass Task(calib=...) "
            "or use the metric measure with eval data"
        )
    if measure == "metric" and task.kind != "custom" and not task.has("eval"):
        raise CompactMLError(
            "measuring a metric drop needs eval data; pass Task(eval=...) or use measure "
            "'output' with calib data"
        )
    return measure


def make_scorer(
    model: nn.Module, task: Task | None, measure: str, batches: int | None
) -> MetricDrop | OutputError:
    """The scorer for ``measure`` (see :func:`resolve_measure`), its baseline taken on
    ``model``."""
    check_batches(batches)
    kind = resolve_measure(task, measure)
    return (MetricDrop if kind == "metric" else OutputError)(model, task, batches)


def check_batches(batches: int | None) -> None:
    """Raise unless ``batches`` is a positive int or None (all batches)."""
    if batches is not None and (type(batches) is not int or batches < 1):
        raise CompactMLError(f"batches must be a positive number or None, got {batches!r}")
