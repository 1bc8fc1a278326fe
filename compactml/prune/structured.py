"""Structured pruning: ``Channels`` and ``Heads`` physically remove channels, neurons and heads.

Both trace the model into groups of coupled channels (:class:`~compactml.prune.graph.Graph`),
score each unit of a group over all its members (:mod:`compactml.prune.importance`), and
remove the lowest-scoring ``ratio`` of the units of every group, slicing each member at once.
The result is a smaller *dense* model with the same outputs shape: no masks, fewer MACs, and a
``.cml`` artifact that rebuilds the smaller layers (``compactml.save`` records them).

- ``Channels``: channels of convolutions, neurons of MLPs (the FFN of a transformer); the
  model's inputs and outputs, and everything tied to them (the residual stream of a
  transformer, whose width is its output's), are never pruned.
- ``Heads``: whole attention heads: the q/k/v output features and the output projection's input
  features of each head, plus the attention module's head-count attributes.

Interactive use: ``Channels(...).groups(model, task)`` returns the scored groups of a copy of
the model; call ``group.remove(indices)`` on the ones you choose and take ``group.graph.model``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from compactml.config import Technique, matches, record
from compactml.errors import CompactMLError
from compactml.prune.graph import Graph, Group
from compactml.prune.importance import IMPORTANCE, score_groups
from compactml.task import Task

#: Words in a Hugging Face config attribute that name an MLP's hidden width.
FFN_CONFIG_WORDS = ("intermediate", "ffn", "inner")


def _check_ratio(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise CompactMLError(
            f"ratio must be a fraction in [0, 1) such as 0.5 (the share of {what} removed), "
            f"got {value!r}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Structured(Technique):
    """Shared by Channels and Heads: trace, score, remove the lowest ``ratio`` per group."""

    family: ClassVar[str] = "prune"
    level: ClassVar[str | None] = "ratio"
    kind: ClassVar[str] = "channels"
    unit: ClassVar[str] = "channels"

    ratio: float
    importance: str = "l1"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ratio(self.ratio, self.unit)
        if self.importance not in IMPORTANCE:
            raise CompactMLError(
                f"unknown importance {self.importance!r}; use one of: {', '.join(IMPORTANCE)}"
            )

    def _graph(self, model: nn.Module, task: Task | None) -> Graph:
        if task is None:
            raise CompactMLError(
                f"{type(self).__name__} traces the model on an example input; pass a task "
                "(e.g. cml.Task(example=x))"
            )
        # Only exclude shapes the trace (an excluded module keeps its channels, and so does
        # everything coupled to them); include picks groups afterwards (see _selected).
        return Graph.build(model, task.example_input(), task=task, exclude=self.exclude)

    def _selected(self, group: Group) -> bool:
        """Whether ``include`` picks ``group``: one of the layers whose outputs are its
        channels (a convolution's out channels, an FFN's hidden neurons, q/k/v for heads)
        matches a pattern. ``include=("layer2.*",)`` prunes the groups produced there, with the
        layers that read them sliced along."""
        return any(m.dim == "out" and matches(m.name, self.include) for m in group.members)

    def _candidates(self, graph: Graph) -> tuple[list[Group], dict[str, str]]:
        """The groups this config prunes, and ``{group: reason}`` for those it leaves."""
        chosen, skipped = [], {}
        if self.kind == "heads" and not any(g.kind == "heads" for g in graph.groups()):
            raise CompactMLError(
                f"Heads found no attention heads in {type(graph.model).__name__} (a reshape of "
                "q, k and v into heads joined by the attention product); use Channels for "
                "convolutions and MLP neurons"
            )
        for group in graph.groups():
            if not self._selected(group):
                continue
            reason = group.pinned_reason()
            if group.kind not in ("fixed", self.kind):
                if self.kind == "channels":
                    skipped[group.name] = "attention heads: remove them with Heads"
            elif reason:
                skipped[group.name] = reason
            else:
                chosen.append(group)
        return chosen, skipped

    def _keep_count(self, group: Group) -> tuple[int, str | None]:
        """How many units ``group`` keeps (``round_to`` applied), and a note when that is
        more than asked so that the group is not emptied."""
        size, round_to = group.size, getattr(self, "round_to", None)
        target = size - math.floor(self.ratio * size + 0.5)
        keep = max(target, 1)
        if round_to is not None:
            keep = min(size, math.ceil(keep / round_to) * round_to)
        if target >= 1:
            return keep, None
        return keep, "at least one kept" if round_to is None else f"round_to={round_to}"

    def groups(self, model: nn.Module, task: Task | None = None) -> list[Group]:
        """Interactive mode: the groups of a *copy* of ``model``, scored with this config's
        importance (``group.importance``; None where the criterion reads nothing or the
        group is not one this config prunes). Choose indices, call ``group.remove(indices)``,
        and take the smaller model from ``group.graph.model``."""
        graph = self._graph(self.copy_model(model), task)
        score_groups(self._candidates(graph)[0], self.importance, task)
        return graph.groups()

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A smaller dense copy of ``model`` with ``ratio`` of each group's units removed."""
        pruned = self.copy_model(model)
        graph = self._graph(pruned, task)
        candidates, skipped = self._candidates(graph)
        score_groups(candidates, self.importance, task)
        changed, plan, kept_more = [], [], []
        for group in candidates:
            if group.importance is None:
                skipped[group.name] = f"importance {self.importance!r} reads no tensor here"
                continue
            before = group.size
            keep, note = self._keep_count(group)
            changed += group.remove(lowest(group, before - keep))
            plan.append({"group": group.name, "before": before, "after": group.size})
            if note or group.size > keep:
                note = note or f"{group.size - keep} cannot be removed"
                kept_more.append(f"{group.name}: kept {group.size} of {before} ({note})")
        if kept_more:
            warnings.warn(
                f"{type(self).__name__}: kept more {self.unit} than ratio={self.ratio} asks so "
                "(no group is emptied; pinned units stay): " + "; ".join(kept_more),
                stacklevel=2,
            )
        details = {"groups": plan, "opaque": graph.opaque, "attributes": graph.head_changes}
        details["config"] = self._update_config(pruned, graph, plan)
        record(pruned, self, sorted(set(changed)), skipped, details)
        return pruned

    def _update_config(self, model: nn.Module, graph: Graph, plan: list[dict]) -> dict:
        return {}


def lowest(group: Group, count: int) -> torch.Tensor:
    """The ``count`` removable units of ``group`` with the lowest importance (ties: the lower
    index first), never the last unit of any member (no layer is left with no channel)."""
    scores = group.importance.clone()
    scores[~group.prunable] = math.inf
    units = [set(m.unit_of.tolist()) for m in group.members]
    left = [len(u) for u in units]
    chosen: list[int] = []
    for unit in torch.sort(scores, stable=True).indices.tolist():
        if len(chosen) >= count or math.isinf(scores[unit]):
            break
        touched = [i for i, member_units in enumerate(units) if unit in member_units]
        if any(left[i] == 1 for i in touched):
            continue
        for i in touched:
            left[i] -= 1
        chosen.append(unit)
    return torch.tensor(chosen, dtype=torch.long)


def hf_configs(model: nn.Module) -> list[Any]:
    """The Hugging Face configs (objects with ``to_dict``) held by modules of ``model``."""
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and callable(getattr(config, "to_dict", None)):
            found[id(config)] = config
    return list(found.values())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Channels(_Structured):
    """Remove ``ratio`` of the channels (neurons) of every prunable group of coupled channels.

    Args:
        ratio: share of each group's channels removed, in [0, 1) (rounded to the nearest
            count; a group always keeps at least one channel, or ``round_to``).
        importance: ``"l1"``, ``"l2"``, ``"taylor"`` (needs ``task.train``) or ``"bn_scale"``
            (see :mod:`compactml.prune.importance`), summed over the whole group.
        round_to: keep a multiple of this many channels per group (rounded up), e.g. 8 for
            vectorized kernels.
        include / exclude: module-name patterns. ``include`` picks the groups to prune by the
            layers that produce them (their output channels), slicing the layers that read
            them too; excluded modules keep their channels, and so does every channel coupled
            to them.

    Returns a smaller dense model with the same outputs shape. Groups cut into attention heads
    are left to :class:`Heads`. A Hugging Face config's MLP width (``intermediate_size``) is
    updated when every MLP was pruned to the same width.
    """

    round_to: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = isinstance(self.round_to, bool) or not isinstance(self.round_to, int | None)
        if bad or (self.round_to is not None and self.round_to < 1):
            raise CompactMLError(
                f"round_to must be a whole number >= 1 such as 8, or None; got {self.round_to!r}"
            )

    def _update_config(self, model: nn.Module, graph: Graph, plan: list[dict]) -> dict:
        """Set a config's MLP width where all groups of that width now share one width."""
        widths = [g.size for g in graph.groups()]  # after pruning
        changes = {}
        for config in hf_configs(model):
            for attr, value in list(vars(config).items()):
                if type(value) is not int or not any(w in attr.lower() for w in FFN_CONFIG_WORDS):
                    continue
                done = {p["after"] for p in plan if p["before"] == value}
                if len(done) == 1 and value not in widths:
                    setattr(config, attr, done.pop())
                    changes[attr] = [value, getattr(config, attr)]
        return changes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Heads(_Structured):
    """Remove ``ratio`` of the attention heads of every attention block (Michel et al. 2019,
    "Are Sixteen Heads Really Better than One?").

    A head is found from the model itself: a reshape that cuts q, k and v into heads, tied
    together by the attention product. Removing it slices the q/k/v output features and the
    output projection's input features of that head, and updates the int attributes of the
    attention module that hold the head count or the total width (``num_attention_heads``,
    ``all_head_size``). ``importance`` as in :class:`Channels`, summed over the head.

    A Hugging Face config cannot express per-layer head counts (transformers 5 dropped
    ``pruned_heads``); the pruned layers and attributes travel in the model and its ``.cml``.
    """

    kind: ClassVar[str] = "heads"
    unit: ClassVar[str] = "heads"

    def _update_config(self, model: nn.Module, graph: Graph, plan: list[dict]) -> dict:
        if not plan or not hf_configs(model):
            return {}
        return {
            "note": "model.config keeps its head count: a Hugging Face config cannot express "
            "per-layer heads (transformers 5 removed pruned_heads); the smaller layers and "
            "head-count attributes are in the model and its .cml"
        }
