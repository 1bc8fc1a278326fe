"""How channels flow through the torch functions a model calls between its layers.

``OPS`` is the one literal table from a torch function name (in-place ``add_`` and ``__iadd__``
read as ``add`` and ``__add__``) to its rule. A rule reads the channel maps of the call's inputs
from the tracer (:mod:`compactml.prune.trace`), merges slots that must go together, pins the ones
that cannot go, and gives the outputs their maps:

- ``unary``: same shape, same channels (activations, dropout, casts, softmax);
- ``elementwise``: operands broadcast together; channels at the same position are one channel
  (a residual add ties the channels of both branches); a per-channel parameter used directly
  (LayerScale, a bias) becomes a member of the group;
- ``move``: views, permutes, flatten, slicing, concatenation: replayed on label tensors, so a
  flatten into a linear layer, a concatenation's offsets and a split into attention heads all
  come out of the same code;
- ``reduce``, ``pool``: channels summed away or kept while spatial dims shrink;
- ``matmul``, ``attention``: contracted channels tie both operands; a channel on a batch dim
  (a head) ties everything of that head;
- ``create``: ``ones_like`` and friends: no channels.

An op missing from the table that reads a traced channel stops the trace with a
:class:`~compactml.errors.CompactMLError` naming it (see ``Tracer.unknown``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from compactml.prune.slots import ChannelMap, collapse, labels, matmul_labels, read_map

if TYPE_CHECKING:
    from compactml.prune.trace import Tracer

Rule = Callable[["Tracer", str, tuple, dict, Any], None]


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a nested structure of tuples, lists and dicts, in order."""
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _first(args: tuple) -> torch.Tensor:
    return tensors(args)[0]


def unary(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Output channels are the input's (shape unchanged)."""
    x = _first(args)
    cmap = tr.map_of(x)
    for o in tensors(out):
        if o.shape == x.shape:
            tr.set_map(o, cmap)
        elif cmap is not None:
            tr.slots.pin(cmap.ids, f"{name} changes the shape of these channels")


def elementwise(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Broadcast operands: channels at the same output position are tied together."""
    outs = tensors(out)
    if not outs:
        return
    shape = outs[0].shape
    operands = tensors((args, kwargs))
    placed = []  # (operand, map with dims in output coordinates)
    for t in operands:
        cmap = tr.map_of(t)
        if cmap is not None:
            offset = len(shape) - t.dim()
            placed.append((t, ChannelMap(tuple(d + offset for d in cmap.dims), cmap.ids)))
    if not placed:
        return
    dims = placed[0][1].dims
    ids = [m.ids for _, m in placed]
    broadcast = any(
        t.shape[d - len(shape) + t.dim()] != shape[d] for t, m in placed for d in m.dims
    )
    if any(m.dims != dims for _, m in placed) or broadcast:
        tr.pin_all(ids, f"{name} combines channels along different dims")
        return
    for other in ids[1:]:
        tr.slots.unite(ids[0], other)
    for t in operands:
        if tr.map_of(t) is None:
            _fixed_operand(tr, name, t, len(shape), dims, ids[0])
    for o in outs:
        if o.shape == shape:
            tr.set_map(o, ChannelMap(dims, ids[0]))


def _fixed_operand(
    tr: Tracer, name: str, t: torch.Tensor, ndim: int, dims: tuple[int, ...], ids: torch.Tensor
) -> None:
    """An operand without channels that is not broadcast along the channel dims: a model
    parameter there becomes a group member; anything else pins the channels."""
    axes = [d - (ndim - t.dim()) for d in dims]
    if all(a < 0 or t.shape[a] == 1 for a in axes):
        return  # broadcast along every channel dim
    own = tr.param_slots(t, axes[0]) if len(axes) == 1 else None
    if own is None:
        tr.slots.pin(ids, f"{name} combines these channels with a tensor of fixed size")
    else:
        tr.slots.unite(ids, own)


def move(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Replay a shape operation on label tensors to see where every channel lands."""
    if not args:
        tr.pin_all([m.ids for t in tensors(kwargs) if (m := tr.map_of(t))], f"{name} (keywords)")
        return
    many = isinstance(args[0], (list, tuple))
    inputs = tensors(args[0]) if many else [args[0]]
    maps = [tr.map_of(t) for t in inputs]
    known = [m.ids.reshape(-1) for m in maps if m is not None]
    if not known:
        return
    ins = torch.cat(known)
    fake = [labels(t.shape, m).contiguous() for t, m in zip(inputs, maps, strict=True)]
    replayed = (type(args[0])(fake) if many else fake[0], *args[1:])
    try:
        label_out = tensors(tr.replay(replayed, kwargs))
    except Exception:  # noqa: BLE001 - an op the labels cannot take: keep its channels
        tr.slots.pin(ins, f"{name} could not be followed")
        return
    for o, label in zip(tensors(out), label_out, strict=False):
        cmap = read_map(label)
        present = torch.unique(cmap.ids) if isinstance(cmap, ChannelMap) else ins[:0]
        if cmap is False or not bool(torch.isin(ins, present).all()):
            tr.slots.pin(ins, f"{name} keeps only part of these channels or mixes them")
        if isinstance(cmap, ChannelMap):
            tr.set_map(o, cmap)
            if not many and len(cmap.dims) > len(maps[0].dims):
                tr.record_split(cmap)


def reduce(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Sum-like reductions: reduced channel dims are read (not pruned away), others survive."""
    x = args[0]
    position = 2 if name == "norm" else 1
    dim = args[position] if len(args) > position else kwargs.get("dim", kwargs.get("axis"))
    if isinstance(dim, torch.Tensor):  # torch.max(x, y) is elementwise
        elementwise(tr, name, args, kwargs, out)
        return
    cmap = tr.map_of(x)
    if cmap is None:
        return
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        reduced = set(range(x.dim()))
    else:
        reduced = {d % x.dim() for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    outs = tensors(out)
    keepdim = bool(outs) and outs[0].dim() == x.dim()
    result = collapse(tr.slots, cmap, reduced, keepdim)
    for o in outs:
        tr.set_map(o, result)


def pool(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """Pooling, resizing and padding act on the trailing spatial dims; channels pass."""
    x = args[0]
    cmap = tr.map_of(x)
    if cmap is None:
        return
    if name == "pad":
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        spatial = len(pad) // 2
    elif name[-2:] in ("1d", "2d", "3d"):
        spatial = int(name[-2])
    else:
        spatial = x.dim() - 2
    for o in tensors(out)[:1]:
        if max(cmap.dims) < x.dim() - spatial and o.dim() == x.dim():
            tr.set_map(o, cmap)
        else:
            tr.slots.pin(cmap.ids, f"{name} reshapes these channels")


def matmul(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """``a @ b`` (``__rmatmul__`` swaps the operands)."""
    a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
    maps = [tr.map_of(a), tr.map_of(b)]
    if maps == [None, None] or not isinstance(b, torch.Tensor):
        return
    if a.dim() < 2 or b.dim() < 2:
        tr.pin_all([m.ids for m in maps if m is not None], f"{name} of a vector")
        return
    label = matmul_labels(tr.slots, labels(a.shape, maps[0]), labels(b.shape, maps[1]), name)
    _set_read(tr, name, tensors(out)[0], label, maps)


def attention(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """``scaled_dot_product_attention(q, k, v)``: ``softmax(q @ k^T) @ v``."""
    names = ("query", "key", "value", "attn_mask")
    q, k, v, mask = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
    maps = [tr.map_of(t) if isinstance(t, torch.Tensor) else None for t in (q, k, v, mask)]
    if maps[3] is not None:
        tr.slots.pin(maps[3].ids, "an attention mask with channels")
    lq, lk, lv = (labels(t.shape, m) for t, m in zip((q, k, v), maps, strict=False))
    try:
        scores = matmul_labels(tr.slots, lq, lk.transpose(-2, -1), name)
        label = matmul_labels(tr.slots, scores, lv, name)
    except RuntimeError:  # grouped-query attention: heads that do not broadcast
        tr.pin_all([m.ids for m in maps if m is not None], f"{name} with grouped heads")
        return
    _set_read(tr, name, tensors(out)[0], label, maps)


def _set_read(tr: Tracer, name: str, o: torch.Tensor, label: torch.Tensor, maps: list) -> None:
    cmap = read_map(label.expand(o.shape) if label.dim() == o.dim() else label)
    if cmap is False:
        tr.pin_all([m.ids for m in maps if m is not None], f"{name} mixes channels")
    elif cmap is not None:
        tr.set_map(o, cmap)


def create(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """``ones_like`` and friends: the output holds no channel of the input."""


def minmax(tr: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> None:
    """``max``/``min``: elementwise with a second tensor, a reduction otherwise."""
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        elementwise(tr, name, args, kwargs, out)
    else:
        reduce(tr, name, args, kwargs, out)


UNARY = (
    "relu", "relu6", "hardtanh", "gelu", "silu", "sigmoid", "tanh", "elu", "selu", "celu",
    "leaky_relu", "softplus", "mish", "hardswish", "hardsigmoid", "logsigmoid", "softsign",
    "tanhshrink", "threshold", "erf", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "__neg__",
    "__pos__", "sin", "cos", "square", "reciprocal", "sign", "clamp", "clamp_min", "clamp_max",
    "clip", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "softmax", "log_softmax", "normalize", "to", "type", "type_as",
    "float", "half", "double", "bfloat16", "contiguous", "clone", "detach", "data",
    "isnan", "isinf", "isfinite", "logical_not", "__invert__", "nan_to_num",
)  # fmt: skip
ELEMENTWISE = (
    "add", "sub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "pow",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__pow__", "__rpow__",
    "__and__", "__or__", "__xor__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "eq", "ne", "lt", "le", "gt", "ge", "where", "masked_fill", "maximum", "minimum", "lerp",
    "addcmul", "addcdiv", "logical_and", "logical_or", "rsub", "subtract", "multiply", "divide",
)  # fmt: skip
MOVE = (
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "T", "mT",
    "unsqueeze", "squeeze", "expand", "expand_as", "view_as", "reshape_as", "__getitem__",
    "chunk", "split", "tensor_split", "unbind", "movedim", "moveaxis", "swapaxes", "swapdims",
    "narrow", "select", "repeat", "repeat_interleave", "tile", "cat", "concat", "concatenate",
    "stack", "hstack", "vstack", "index_select",
)  # fmt: skip
REDUCE = (
    "sum", "mean", "amax", "amin", "norm", "var", "std", "logsumexp", "prod", "nansum",
    "nanmean", "argmax", "argmin", "all", "any", "median", "var_mean", "std_mean",
)  # fmt: skip
POOL = (
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate",
    "upsample", "upsample_nearest", "upsample_bilinear", "pad",
)  # fmt: skip
CREATE = (
    "ones_like", "zeros_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "new_ones", "new_zeros", "new_empty", "new_full", "new_tensor",
)  # fmt: skip

OPS: dict[str, Rule] = {
    **dict.fromkeys(UNARY, unary),
    **dict.fromkeys(ELEMENTWISE, elementwise),
    **dict.fromkeys(MOVE, move),
    **dict.fromkeys(REDUCE, reduce),
    **dict.fromkeys(POOL, pool),
    **dict.fromkeys(CREATE, create),
    "max": minmax,
    "min": minmax,
    "matmul": matmul,
    "__matmul__": matmul,
    "__rmatmul__": matmul,
    "bmm": matmul,
    "mm": matmul,
    "scaled_dot_product_attention": attention,
}


def op_name(func: Any) -> str:
    """The table name of a torch function: property getters by their property (``mT``),
    in-place variants by their plain name (``add_`` -> ``add``, ``__iadd__`` -> ``__add__``)."""
    name = getattr(func, "__name__", "") or ""
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__i") and name.endswith("__") and f"__{name[3:]}" in OPS:
        return f"__{name[3:]}"
    if name.endswith("_") and not name.endswith("__") and name[:-1] in OPS:
        return name[:-1]
    return name
