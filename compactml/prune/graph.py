"""The dependency graph of structured pruning: groups of coupled channels.

Removing output channel ``c`` of a convolution also removes input channel ``c`` of every layer
that reads it, the BatchNorm entries in between, and, through a residual add, channel ``c`` of
every other layer writing into the same sum. Torch-Pruning (Fang et al. 2023, "DepGraph:
Towards Any Structural Pruning") calls such a set a *group*; this module finds them.

``Graph.build(model, example_input)`` traces the model once (:mod:`compactml.prune.trace`)
and returns the groups: each :class:`Group` has *units* (a channel across all its layers, or a
whole attention head) and *members* (one dim of one layer, or of a per-channel parameter, with
the unit of each of its positions). ``group.remove(indices)`` slices every member at once, so
the model stays consistent: concatenations (offsets), flatten into a linear layer (each channel
owns ``H*W`` features), depthwise convolutions (input channel = output channel) and attention
heads are all just index mappings. Units that cannot be removed (the model's outputs, layers
fed by the model input, excluded modules) are pinned, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compactml.config import matches, replace_module
from compactml.errors import CompactMLError
from compactml.prune.handlers import handler_for
from compactml.prune.importance import score_groups
from compactml.prune.slots import Slots
from compactml.prune.trace import Tracer, trace
from compactml.task import Task

DEAD = "not read by the rest of the model"


@dataclass
class Member:
    """One prunable dim of a group: dim ``"in"``/``"out"`` of layer ``name``, or, when
    ``axis`` is set, axis ``axis`` of the parameter or buffer ``name.dim``. ``unit_of[p]`` is
    the unit (index in the group) of position ``p`` along that dim."""

    name: str
    dim: str
    unit_of: torch.Tensor
    axis: int | None = None

    @property
    def label(self) -> str:
        """``conv1.out``, ``fc.in`` or ``blocks.0.gamma[0]``."""
        where = f"{self.name}.{self.dim}" if self.name else self.dim
        return where if self.axis is None else f"{where}[{self.axis}]"


@dataclass
class Heads:
    """Module ``owner`` cut ``heads`` heads of ``head_dims`` channels out of one channel dim."""

    owner: str
    heads: int
    head_dims: set[int]


@dataclass(eq=False)
class Group:
    """Coupled channels: ``members`` sliced together, one removable unit per channel (or per
    head). ``reasons[u]`` says why unit ``u`` must stay (None when it may go); ``kind`` is
    ``"channels"``, ``"heads"`` (every unit is an attention head of ``heads``) or ``"fixed"``
    (channels cut into pieces by a reshape, which cannot change size). ``importance`` is set
    by the configs' ``groups()`` (higher = more important)."""

    graph: Graph
    members: list[Member]
    reasons: list[str | None]
    kind: str = "channels"
    heads: list[Heads] = field(default_factory=list)
    importance: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of units (channels, or heads)."""
        return len(self.reasons)

    @property
    def prunable(self) -> torch.Tensor:
        """Bool per unit: True when it may be removed."""
        return torch.tensor([r is None for r in self.reasons], dtype=torch.bool)

    @property
    def name(self) -> str:
        """A label for reports: the first member (``layer1.0.conv1.out``)."""
        return self.members[0].label

    def pinned_reason(self) -> str | None:
        """Why no unit may be removed, or None when some may."""
        if any(r is None for r in self.reasons):
            return None
        return next((r for r in self.reasons if r), "pinned")

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for reports."""
        return {
            "name": self.name,
            "kind": self.kind,
            "units": self.size,
            "members": [m.label for m in self.members],
        }

    def remove(self, indices: Sequence[int] | torch.Tensor) -> list[str]:
        """Remove units ``indices`` from every member (the graph's model is changed in
        place); returns the names of the changed modules. Head-count attributes of the
        modules that cut the heads are updated (see :meth:`Graph.update_heads`)."""
        drop = torch.as_tensor(list(indices) if not torch.is_tensor(indices) else indices)
        drop = torch.unique(drop.to(torch.long).reshape(-1))
        self._check_removal(drop)
        if not len(drop):
            return []
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[drop] = False
        renumber = torch.cumsum(keep, 0) - 1
        changed = []
        for member in self.members:
            positions = torch.nonzero(keep[member.unit_of]).reshape(-1)
            self.graph.slice_member(member, positions)
            member.unit_of = renumber[member.unit_of[positions]]
            changed.append(member.name)
        self.reasons = [r for r, k in zip(self.reasons, keep.tolist(), strict=True) if k]
        if self.importance is not None:
            self.importance = self.importance[keep]
        for heads in self.heads:
            changed += self.graph.update_heads(heads, self.size)
        return list(dict.fromkeys(changed))

    def _check_removal(self, drop: torch.Tensor) -> None:
        if len(drop) and (int(drop.min()) < 0 or int(drop.max()) >= self.size):
            raise CompactMLError(
                f"group {self.name} has {self.size} units; indices must be in 0..{self.size - 1}"
            )
        if len(drop) >= self.size:
            raise CompactMLError(
                f"removing {len(drop)} of {self.size} units would empty group {self.name}; "
                "keep at least one"
            )
        for member in self.members:
            if bool(torch.isin(member.unit_of, drop).all()):
                raise CompactMLError(
                    f"removing units {drop.tolist()} would leave {member.label} of group "
                    f"{self.name} with no channel; keep at least one of its units"
                )
        for unit in drop.tolist():
            if self.reasons[unit] is not None:
                raise CompactMLError(
                    f"unit {unit} of group {self.name} cannot be removed: {self.reasons[unit]}"
                )


class Graph:
    """Groups of coupled channels of ``model`` (use :meth:`build`).

    ``group.remove`` changes ``graph.model`` in place; build the graph on a copy to keep the
    original. ``opaque`` lists modules whose channels were left alone, with the reason.
    """

    def __init__(self, model: nn.Module, tracer: Tracer) -> None:
        self.model = model
        self.opaque = dict(tracer.opaque)
        self.head_changes: list[str] = []
        self._groups = _make_groups(self, model, tracer)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_input: Any,
        *,
        task: Task | None = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
    ) -> Graph:
        """Trace ``model`` once on ``example_input`` (through ``task.run`` when given) and
        find its groups. Modules matching ``exclude`` (fnmatch on names, parents included)
        keep their channels, as does every channel coupled to them."""
        include, exclude = tuple(include), tuple(exclude)

        def selects(name: str) -> bool:
            return matches(name, include) and not matches(name, exclude)

        return cls(model, trace(model, example_input, selects, task))

    def groups(self, kind: str | None = None) -> list[Group]:
        """The groups (of one ``kind`` when given), in the order of the model's modules."""
        return [g for g in self._groups if kind is None or g.kind == kind]

    def score(self, importance: str = "l1", task: Task | None = None) -> list[Group]:
        """Set ``group.importance`` (one score per unit, higher = keep) on every group with a
        removable unit, with criterion ``importance`` (``l1``, ``l2``, ``taylor`` with
        ``task.train``, ``bn_scale``; see :mod:`compactml.prune.importance`); returns all
        groups, for the caller to choose what to ``remove``."""
        score_groups([g for g in self._groups if g.pinned_reason() is None], importance, task)
        return self.groups()

    def slice_member(self, member: Member, positions: torch.Tensor) -> None:
        """Keep only ``positions`` along ``member``'s dim (replaces the layer)."""
        module = self.model.get_submodule(member.name)
        if member.axis is not None:
            old = getattr(module, member.dim)
            data = old.detach().index_select(member.axis, positions.to(old.device)).clone()
            if isinstance(old, nn.Parameter):
                setattr(module, member.dim, nn.Parameter(data, old.requires_grad))
            else:
                module._buffers[member.dim] = data
            return
        new = handler_for(module).slice(module, member.dim, positions)
        if not member.name:
            raise CompactMLError("the model is a single layer; there is nothing to prune")
        replace_module(self.model, member.name, new)

    def update_heads(self, heads: Heads, count: int) -> list[str]:
        """Set the head-count attributes of ``heads.owner`` for ``count`` heads left.

        Generic, not by class name: int attributes whose name contains "head" and whose value
        is the head count (``num_attention_heads``, ``num_heads``) or the total width
        (``all_head_size``); a name with "size" or "dim" equal to the head count is taken
        for the head size and left alone.
        """
        module = self.model.get_submodule(heads.owner)
        totals = {heads.heads * d: d for d in heads.head_dims}
        changed = []
        for attr, value in list(vars(module).items()):
            if type(value) is not int or "head" not in attr.lower():
                continue
            if value in totals:
                new = count * totals[value]
            elif value == heads.heads and not any(w in attr.lower() for w in ("size", "dim")):
                new = count
            else:
                continue
            setattr(module, attr, new)
            self.head_changes.append(f"{heads.owner}.{attr}: {value} -> {new}")
            changed.append(heads.owner)
        heads.heads = count
        return changed


def _members(model: nn.Module, tracer: Tracer) -> list[tuple[Member, torch.Tensor]]:
    """Every traced dim, in module order, with its slots."""
    out = []
    for name, _ in model.named_modules():
        for dim, slots in tracer.layers.get(name, {}).items():
            out.append((Member(name, dim, torch.empty(0, dtype=torch.long)), slots))
    for (name, attr, axis), slots in tracer.params.items():
        out.append((Member(name, attr, torch.empty(0, dtype=torch.long), axis), slots))
    return out


def _unit_reasons(tracer: Tracer) -> dict[int, str]:
    """``{unit: reason}`` for pinned units and for units nothing reads."""
    slots = tracer.slots
    reasons = slots.pinned_units()
    read = {slots.find(s) for s in slots.used}
    for dims in tracer.layers.values():
        if "in" in dims:
            read.update(slots.find(s) for s in dims["in"].tolist())
    return reasons | {
        slots.find(s): DEAD
        for dims in tracer.layers.values()
        for s in dims["out"].tolist()
        if slots.find(s) not in read and slots.find(s) not in reasons
    }


def _make_groups(graph: Graph, model: nn.Module, tracer: Tracer) -> list[Group]:
    slots = tracer.slots
    entries = [(m, torch.tensor([slots.find(s) for s in ids.tolist()], dtype=torch.long))
               for m, ids in _members(model, tracer)]  # fmt: skip
    # Members sharing a unit belong to one group: a second union-find, over units.
    linker = Slots()
    linker.parent = list(range(len(slots.parent)))
    for _, roots in entries:
        linker.merge(roots)
    reasons = _unit_reasons(tracer)
    groups: dict[int, Group] = {}
    order: dict[int, dict[int, int]] = {}
    for member, roots in entries:
        if not len(roots):
            continue
        key = linker.find(int(roots[0]))
        units = order.setdefault(key, {})
        for r in roots.tolist():
            units.setdefault(r, len(units))
        member.unit_of = torch.tensor([units[r] for r in roots.tolist()], dtype=torch.long)
        group = groups.setdefault(key, Group(graph, [], []))
        group.members.append(member)
    for key, group in groups.items():
        group.reasons = [reasons.get(r) for r in order[key]]
    _mark_heads(tracer, linker, groups, order)
    return list(groups.values())


def _mark_heads(
    tracer: Tracer, linker: Slots, groups: dict[int, Group], order: dict[int, dict[int, int]]
) -> None:
    """Give each group its head splits: ``heads`` when every unit is exactly one head of every
    split, else ``fixed`` (the reshape's sizes cannot change)."""
    find = tracer.slots.find
    for split in tracer.splits:
        blocks = [{find(s) for s in head.reshape(-1).tolist()} for head in split.ids]
        key = linker.find(next(iter(blocks[0])))
        group = groups.get(key)
        if group is None:
            continue
        whole = all(len(b) == 1 for b in blocks) and len({next(iter(b)) for b in blocks}) == len(
            blocks
        )
        if group.kind != "fixed" and whole and len(blocks) == group.size:
            group.kind = "heads"
            head_dim = split.ids[0].numel()
            known = next((h for h in group.heads if h.owner == split.owner), None)
            if known is None:
                group.heads.append(Heads(split.owner, len(blocks), {head_dim}))
            else:
                known.head_dims.add(head_dim)
        else:
            group.kind = "fixed"
            reason = f"channels cut into fixed pieces by a reshape in {split.owner or 'the model'}"
            group.reasons = [r or reason for r in group.reasons]
