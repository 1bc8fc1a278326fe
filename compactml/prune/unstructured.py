"""Unstructured pruning: ``Magnitude`` and ``Taylor``, per layer or global, on a schedule.

Each selected ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (exact types) gets a keep-mask
buffer (:mod:`compactml.prune.masks`) that zeroes its least important weights; the model keeps
its dense shapes. The criteria are pure functions in :mod:`compactml.prune.criteria`; the
schedule (:mod:`compactml.prune.schedule`) decides when to prune and whether to fine-tune.
"""

from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from compactml.config import Technique, record
from compactml.errors import CompactMLError
from compactml.prune import criteria
from compactml.prune.masks import attach_mask, get_mask, sparsity
from compactml.prune.schedule import Iterative, OneShot
from compactml.task import Task

PRUNE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
LAYER_TYPES = "Linear, Conv1d or Conv2d"
SCOPES = ("layer", "global")
Schedule = OneShot | Iterative


def select_layers(
    technique: Technique, model: nn.Module, check: Any = None
) -> tuple[list[str], dict[str, str]]:
    """Names of the selected prunable layers of ``model`` and the skipped ones with the
    reason: a weight with NaN or inf, or ``check(name, layer)`` returning a reason."""
    chosen = technique.targets(model, PRUNE_TYPES)
    if not chosen:
        raise CompactMLError(
            f"{type(technique).__name__} found no {LAYER_TYPES} layer selected by "
            f"include={list(technique.include)} exclude={list(technique.exclude)}; check the "
            "patterns against the model's module names"
        )
    names, skipped = [], {}
    for name, layer in chosen:
        reason = None if check is None else check(name, layer)
        if reason is None and not bool(torch.isfinite(layer.weight).all()):
            reason = "the weight has NaN or inf values; fix the weights or exclude it"
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    if skipped:
        listed = "; ".join(f"{name or 'model'}: {why}" for name, why in skipped.items())
        warnings.warn(
            f"{type(technique).__name__} skipped {len(skipped)} layer(s): {listed}", stacklevel=4
        )
    if not names:
        first = next(iter(skipped.items()), None)
        why = f" ({first[0] or 'model'}: {first[1]})" if first else ""
        raise CompactMLError(
            f"{type(technique).__name__}: no selected layer can be pruned{why}; select other "
            "layers with include/exclude"
        )
    return names, skipped


def masked_scores(layer: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with the layer's already-pruned weights at ``-inf`` (they are pruned first,
    and the counts of a new mask include them)."""
    old = get_mask(layer)
    if old is None:
        return scores
    return scores.masked_fill(~old.to(scores.device), float("-inf"))


def _schedule(value: Any) -> Schedule:
    """A schedule object from itself, ``"one_shot"``/``"iterative"``, or a recipe's dict
    ``{"kind": "iterative", "steps": 5, ...}``."""
    if isinstance(value, OneShot | Iterative):
        return value
    kinds = {"one_shot": OneShot, "iterative": Iterative}
    if isinstance(value, str) and value in kinds:
        return kinds[value]()
    if isinstance(value, dict) and value.get("kind") in kinds:
        params = {k: v for k, v in value.items() if k != "kind"}
        try:
            return kinds[value["kind"]](**params)
        except TypeError as exc:
            raise CompactMLError(f"bad schedule parameters {params}: {exc}") from exc
    raise CompactMLError(
        f"schedule must be OneShot() or Iterative(steps=..., epochs=...), got {value!r}"
    )


@dataclasses.dataclass(frozen=True)
class _Unstructured(Technique):
    """Shared fields and plumbing of ``Magnitude`` and ``Taylor``."""

    family: ClassVar[str] = "prune"
    level: ClassVar[str | None] = "sparsity"
    sparsity: float = 0.5
    scope: str = "layer"
    schedule: Schedule = OneShot()

    def __post_init__(self) -> None:
        super().__post_init__()
        criteria.check_sparsity(self.sparsity)
        if self.scope not in SCOPES:
            raise CompactMLError(
                f"scope={self.scope!r} is not known; use 'layer' (each layer to the sparsity) "
                "or 'global' (one threshold over all selected layers)"
            )
        object.__setattr__(self, "schedule", _schedule(self.schedule))

    def params(self) -> dict[str, Any]:
        """The config as plain values, the schedule as a dict with its ``kind``."""
        return super().params() | {"schedule": self.schedule.params()}

    @abc.abstractmethod
    def scores(self, model: nn.Module, names: list[str], task: Task | None) -> dict:
        """Importance of every weight of the layers ``names`` (higher is kept)."""

    def prune_step(
        self, model: nn.Module, names: list[str], sparsity: float, task: Task | None
    ) -> None:
        """Attach masks at ``sparsity`` (this config's scope) to the layers ``names`` of
        ``model``, in place; earlier masks are kept."""
        layers = {name: model.get_submodule(name) for name in names}
        raw = self.scores(model, names, task)
        scores = {name: masked_scores(layers[name], raw[name]) for name in names}
        if self.scope == "global":
            masks = criteria.global_masks(scores, sparsity)
        else:
            masks = {name: criteria.layer_mask(s, sparsity) for name, s in scores.items()}
        for name, mask in masks.items():
            attach_mask(layers[name], mask)

    def check_task(self, task: Task | None) -> None:
        """Raise unless ``task`` has what this config needs."""
        if self.schedule.needs_training() and not (isinstance(task, Task) and task.has("train")):
            raise CompactMLError(
                f"{type(self).__name__} with an Iterative schedule fine-tunes on task.train; "
                f"pass prune(model, {type(self).__name__}(...), task) with a Task(train=...)"
            )

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A pruned copy of ``model`` (same shapes, ``weight_mask`` buffers on the pruned
        layers); ``model`` is unchanged."""
        self.check_task(task)
        new = self.copy_model(model)
        names, skipped = select_layers(self, new)
        new = self.schedule.run(self, model, new, names, task)
        report = sparsity(new)
        layers = {name: round(report.layers[name], 6) for name in names}
        record(new, self, names, skipped, {"sparsity": layers})
        return new


@dataclasses.dataclass(frozen=True)
class Magnitude(_Unstructured):
    """Magnitude pruning: zero the weights of smallest ``|w|`` (Han et al. 2015, "Learning
    both Weights and Connections for Efficient Neural Networks").

    Args:
        sparsity: share of weights to zero, in [0, 1) (default 0.5): exactly
            ``round(sparsity * n)`` of each layer's ``n`` weights (``scope="layer"``) or of all
            selected weights together (``scope="global"``, one threshold; layers with smaller
            weights lose more).
        scope: ``"layer"`` or ``"global"``.
        schedule: ``OneShot()`` or ``Iterative(steps, epochs, lr, ...)`` (cubic ramp with
            fine-tuning on ``task.train``, Zhu and Gupta 2017).
        include, exclude: fnmatch patterns on module names (Linear, Conv1d and Conv2d layers).

    Weights pruned earlier (a model that already has masks) stay pruned and count toward the
    sparsity.
    """

    def scores(self, model: nn.Module, names: list[str], task: Task | None) -> dict:
        """``|w|`` of each layer's weight."""
        return {n: criteria.magnitude_scores(model.get_submodule(n).weight) for n in names}


@dataclasses.dataclass(frozen=True)
class Taylor(_Unstructured):
    """First-order Taylor pruning: zero the weights of smallest ``|w * dL/dw|``, accumulated
    over ``batches`` batches of ``task.train`` (Molchanov et al. 2019, "Importance Estimation
    for Neural Network Pruning").

    Args:
        sparsity, scope, schedule, include, exclude: as for :class:`Magnitude`.
        batches: training batches the scores are accumulated over (recomputed at every step
            of an iterative schedule).
    """

    batches: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise CompactMLError(f"batches must be an integer >= 1, got {self.batches!r}")

    def check_task(self, task: Task | None) -> None:
        """Taylor scores need ``task.train``."""
        if not (isinstance(task, Task) and task.has("train")):
            raise CompactMLError(
                "Taylor scores weights with gradients from task.train; pass "
                "prune(model, Taylor(...), task) with a Task(train=...)"
            )

    def scores(self, model: nn.Module, names: list[str], task: Task | None) -> dict:
        """``|w * dL/dw|`` summed over the first ``batches`` training batches."""
        assert task is not None  # checked by check_task
        return criteria.taylor_scores(model, task, names, self.batches)
