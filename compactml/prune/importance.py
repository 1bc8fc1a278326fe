"""Importance of the units of a group: one score per channel (or head), higher = keep.

A unit's score adds up, over every member of its group, the scores of the weights that would
be removed with it (the ``(tensor, axis)`` slices each layer's handler names), so a criterion
never looks at the layer type. Each member's scores are first divided by their mean over the
group's units (the mean normalizer of Fang et al. 2023, "DepGraph"), so a BatchNorm scale
counts as much as the much larger convolution filter before it (a filter's norm alone means
little when a BatchNorm rescales its output):

- ``l1``: sum of ``|w|`` (Li et al. 2017, "Pruning Filters for Efficient ConvNets", applied to
  the whole group as in Fang et al. 2023, "DepGraph");
- ``l2``: sum of ``w**2``;
- ``taylor``: sum of ``|w * dL/dw|`` accumulated over ``task.train`` batches (Molchanov et al.
  2019, "Importance Estimation for Neural Network Pruning");
- ``bn_scale``: sum of ``|gamma|`` of the group's normalization layers (Liu et al. 2017,
  "Learning Efficient Convolutional Networks through Network Slimming"); a group with no
  normalization layer gets no score (it is left alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.prune.criteria import taylor_sums
from compactml.prune.handlers import handler_for
from compactml.task import Task

if TYPE_CHECKING:  # graph.py imports this module
    from compactml.prune.graph import Group, Member

TAYLOR_BATCHES = 8  # training batches the Taylor scores are accumulated over


@dataclass(frozen=True)
class Criterion:
    """How one weight element scores (``element(w, taylor)``), over which tensors (``scales``:
    normalization scales only), and whether it needs training batches."""

    element: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    scales: bool = False
    needs_train: bool = False


IMPORTANCE: dict[str, Criterion] = {
    "l1": Criterion(lambda w, _: w.detach().float().abs()),
    "l2": Criterion(lambda w, _: w.detach().float().pow(2)),
    "taylor": Criterion(lambda w, t: t, needs_train=True),
    "bn_scale": Criterion(lambda w, _: w.detach().float().abs(), scales=True),
}


def member_tensors(
    model: nn.Module, member: Member, scales: bool
) -> list[tuple[torch.Tensor, int]]:
    """The ``(tensor, axis)`` pairs cut with ``member`` (its normalization scales only when
    ``scales``)."""
    module = model.get_submodule(member.name)
    if member.axis is not None:
        return [] if scales else [(getattr(module, member.dim), member.axis)]
    handler = handler_for(module)
    return handler.scales(module) if scales else handler.params(module, member.dim)


def unit_scores(
    group: Group, criterion: Criterion, taylor: dict[int, torch.Tensor] | None = None
) -> torch.Tensor | None:
    """One score per unit of ``group`` (float64): the sum over members of the member's scores
    divided by their mean; None when no member has a tensor the criterion reads."""
    total = torch.zeros(group.size, dtype=torch.float64)
    found = False
    for member in group.members:
        for tensor, axis in member_tensors(group.graph.model, member, criterion.scales):
            extra = taylor.get(id(tensor)) if taylor is not None else None
            if criterion.needs_train and extra is None:
                continue
            per_weight = criterion.element(tensor, extra).movedim(axis, 0)
            per_position = per_weight.reshape(per_weight.shape[0], -1).sum(1).double()
            per_unit = torch.zeros_like(total).index_add_(0, member.unit_of, per_position)
            mean = per_unit.mean()
            total += per_unit / mean if mean > 0 else per_unit
            found = True
    return total if found else None


def taylor_table(
    model: nn.Module, task: Task, tensors: list[torch.Tensor], batches: int = TAYLOR_BATCHES
) -> dict[int, torch.Tensor]:
    """``{id(tensor): sum over batches of |w * dL/dw|}`` for the float parameters among
    ``tensors``, from ``task.batch_loss`` on the first ``batches`` batches of ``task.train``
    (eval mode; the model's weights and ``.grad`` are left as they were)."""
    params = list({id(t): t for t in tensors if isinstance(t, nn.Parameter)}.values())
    sums = taylor_sums(model, task, params, batches)
    return {id(p): total for p, total in zip(params, sums, strict=True)}


def score_groups(
    groups: list[Group], importance: str, task: Task | None
) -> dict[int, torch.Tensor | None]:
    """Set ``group.importance`` on every group (None when the criterion reads nothing there);
    returns ``{index: scores}``. Taylor needs ``task.train``."""
    if importance not in IMPORTANCE:
        raise CompactMLError(
            f"unknown importance {importance!r}; use one of: {', '.join(IMPORTANCE)}"
        )
    criterion = IMPORTANCE[importance]
    taylor = None
    if criterion.needs_train and groups:
        if task is None or not task.has("train"):
            raise CompactMLError(
                "importance='taylor' needs training batches; pass a task with train=..."
            )
        model = groups[0].graph.model
        tensors = [t for g in groups for m in g.members for t, _ in member_tensors(model, m, False)]
        taylor = taylor_table(model, task, tensors)
    out = {}
    for i, group in enumerate(groups):
        group.importance = unit_scores(group, criterion, taylor)
        out[i] = group.importance
    return out
