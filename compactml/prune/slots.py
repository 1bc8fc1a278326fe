"""Channel slots: the bookkeeping under the dependency graph.

Every channel position of a prunable dim (an output channel of a convolution, an input feature
of a linear layer, a per-channel parameter) is one integer *slot*. Slots that must be removed
together are merged in a union-find (:class:`Slots`); a merged set is one prunable *unit* (a
channel across every layer that reads or writes it, or a whole attention head). A slot can be
*pinned* (never removed: the model's outputs, a layer fed by the model's input, an excluded
module), which pins its whole unit.

A traced tensor carries a :class:`ChannelMap`: which of its dims hold channels and the slot of
each position there. Maps are turned into *label tensors* (the tensor's shape, each element the
slot of its channel, ``-1`` where no channel is known) so that shape operations (views, permutes,
concatenations, slicing) can be replayed on the labels to see where every channel goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNMAPPED = -1


@dataclass(frozen=True)
class ChannelMap:
    """The channel dims of a tensor (ascending) and the slot of each position along them:
    ``ids.shape == tuple(tensor.shape[d] for d in dims)``."""

    dims: tuple[int, ...]
    ids: torch.Tensor


class Slots:
    """A union-find over channel slots, with pins (slot -> reason) and used slots."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pins: dict[int, str] = {}
        self.used: set[int] = set()

    def new(self, count: int) -> torch.Tensor:
        """``count`` fresh slots, each its own unit."""
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return torch.arange(start, start + count)

    def find(self, slot: int) -> int:
        """The representative of ``slot``'s unit (with path halving)."""
        parent = self.parent
        while parent[slot] != slot:
            parent[slot] = parent[parent[slot]]
            slot = parent[slot]
        return slot

    def union(self, a: int, b: int) -> None:
        """Put slots ``a`` and ``b`` in the same unit."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def unite(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Unite ``a[i]`` with ``b[i]`` elementwise (same shape); ``-1`` entries are skipped."""
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], dim=1)
        pairs = pairs[(pairs >= 0).all(dim=1)]
        for x, y in torch.unique(pairs, dim=0).tolist() if len(pairs) else []:
            self.union(x, y)

    def merge(self, ids: torch.Tensor) -> None:
        """Put every slot in ``ids`` (``-1`` skipped) in one unit."""
        members = torch.unique(ids[ids >= 0]).tolist()
        for other in members[1:]:
            self.union(members[0], other)

    def pin(self, ids: torch.Tensor | list[int], reason: str) -> None:
        """Mark the slots ``ids`` (``-1`` skipped) as never removed, keeping the first reason."""
        values = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else ids
        for slot in values:
            if slot >= 0:
                self.pins.setdefault(slot, reason)

    def use(self, ids: torch.Tensor) -> None:
        """Mark slots as read by the computation (summed, contracted), so not dead."""
        self.used.update(x for x in torch.unique(ids).tolist() if x >= 0)

    def pinned_units(self) -> dict[int, str]:
        """``{representative: reason}`` of every unit holding a pinned slot."""
        out: dict[int, str] = {}
        for slot, reason in self.pins.items():
            out.setdefault(self.find(slot), reason)
        return out


def labels(shape: torch.Size | tuple[int, ...], cmap: ChannelMap | None) -> torch.Tensor:
    """The label tensor of a tensor of ``shape``: each element holds the slot of its channel
    (``-1`` everywhere when ``cmap`` is None). A broadcast view: nothing is copied."""
    if cmap is None:
        return torch.full((1,) * len(shape), UNMAPPED, dtype=torch.long).expand(shape)
    view = [1] * len(shape)
    for d, size in zip(cmap.dims, cmap.ids.shape, strict=True):
        view[d] = size
    return cmap.ids.reshape(view).expand(shape)


def read_map(label: torch.Tensor) -> ChannelMap | None | bool:
    """The channel map a label tensor encodes: the dims along which labels vary and the labels
    along them. None when no channel is there; False when the labels are not a product of
    channel dims and other dims (channels mixed with something else, e.g. concatenated along
    a non-channel dim with an untraced tensor)."""
    if label.numel() == 0:
        return None
    dims = tuple(d for d in range(label.dim()) if bool((label != label.narrow(d, 0, 1)).any()))
    index = tuple(slice(None) if d in dims else 0 for d in range(label.dim()))
    ids = label[index]
    if not dims:
        return None
    if not bool((labels(label.shape, ChannelMap(dims, ids)) == label).all()):
        return False
    return ChannelMap(dims, ids.clone())


def collapse(slots: Slots, cmap: ChannelMap, reduced: set[int], keepdim: bool) -> ChannelMap | None:
    """The map after dims ``reduced`` are summed away: the slots summed into one position are
    merged (they are read together), the other channel dims survive (shifted when the reduced
    dims disappear)."""
    kept = [i for i, d in enumerate(cmap.dims) if d not in reduced]
    gone = [i for i, d in enumerate(cmap.dims) if d in reduced]
    if not gone:
        ids = cmap.ids
    else:
        slots.use(cmap.ids)
        if not kept:
            return None
        moved = cmap.ids.permute(*kept, *gone).reshape(*(cmap.ids.shape[i] for i in kept), -1)
        flat = moved.reshape(-1, moved.shape[-1])
        for row in flat:
            slots.merge(row)
        ids = moved[..., 0]
    dims = [cmap.dims[i] for i in kept]
    if not keepdim:
        dims = [d - sum(1 for r in reduced if r < d) for d in dims]
    return ChannelMap(tuple(dims), ids.contiguous())


def matmul_labels(slots: Slots, la: torch.Tensor, lb: torch.Tensor, what: str) -> torch.Tensor:
    """Labels of ``a @ b`` from the labels of ``a (..., n, k)`` and ``b (..., k, m)``.

    Channels on the contracted dim of both operands are the same channels (merged position by
    position); a channel dim of only one operand contracted against plain data is pinned. A
    channel on a batch dim (an attention head) ties everything of that batch position in both
    operands into one unit. Rows of ``a`` and columns of ``b`` pass to the output.
    """
    batch = torch.broadcast_shapes(la.shape[:-2], lb.shape[:-2])
    la = la.expand(*batch, *la.shape[-2:])
    lb = lb.expand(*batch, *lb.shape[-2:])
    a_con, b_con = la[..., 0, :], lb[..., :, 0]
    if _varies(a_con, -1) and _varies(b_con, -1):
        slots.unite(a_con, b_con)
        slots.use(a_con)
    elif _varies(a_con, -1) or _varies(b_con, -1):
        side = a_con if _varies(a_con, -1) else b_con
        slots.pin(side, f"{what} contracts these channels with a tensor of fixed size")
    nb = len(batch)
    if nb and (_varies_between(la, nb) or _varies_between(lb, nb)):
        flat_a, flat_b = la.reshape(-1, *la.shape[nb:]), lb.reshape(-1, *lb.shape[nb:])
        blocks = torch.cat([flat_a.reshape(len(flat_a), -1), flat_b.reshape(len(flat_b), -1)], 1)
        for block in torch.unique(blocks, dim=0):
            slots.merge(block)
            slots.use(block)
    rows, cols = la[..., :, :1], lb[..., :1, :]
    out_shape = (*batch, la.shape[-2], lb.shape[-1])
    if _varies(cols, -1):
        if _varies(rows, -2):
            slots.pin(torch.cat([rows.reshape(-1), cols.reshape(-1)]), f"{what} crosses channels")
            return labels(out_shape, None)
        return cols.expand(out_shape)
    if _varies(rows, -2):
        return rows.expand(out_shape)
    rep = torch.maximum(la[..., :1, :1], lb[..., :1, :1])
    return rep.expand(out_shape)


def _varies(label: torch.Tensor, dim: int) -> bool:
    return label.shape[dim] > 1 and bool((label != label.narrow(dim, 0, 1)).any())


def _varies_between(label: torch.Tensor, nb: int) -> bool:
    """True when the labels differ between batch positions (a channel on a batch dim)."""
    return any(_varies(label, d) for d in range(nb))
