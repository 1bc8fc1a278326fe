"""One small handler per layer type: all that structured pruning knows about a layer.

``HANDLERS`` is the one literal table from a layer class (exact type, not subclasses) to its
handler. The dependency graph (:mod:`compactml.prune.graph`), the importance scores
(:mod:`compactml.prune.importance`) and the slicing read layers only through it, so no
criterion branches on the layer type. A handler answers:

- ``sizes(m)``: the channel dims the layer owns, ``{"in": n, "out": m}``; a layer whose input
  channels *are* its output channels (BatchNorm, LayerNorm, a depthwise convolution) owns only
  ``"out"`` and says through ``coupling(m)`` which input channel feeds each output channel;
- ``in_axis`` / ``out_axis``: where those channels sit in the input / output tensor;
- ``params(m, dim)``: the ``(tensor, axis)`` pairs cut when channels of ``dim`` are removed
  (importance is read from them), and ``scales(m)`` the normalization scales (``bn_scale``);
- ``slice(m, dim, keep)``: a new, smaller layer of the same type keeping channels ``keep``;
- ``opaque(m)``: why the layer's channels cannot be pruned at all (a grouped convolution), or
  None. ``OPAQUE`` lists layer types whose channels are never pruned, with the reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

Params = list[tuple[torch.Tensor, int]]


def _param(tensor: torch.Tensor, index: torch.Tensor, axis: int) -> nn.Parameter:
    """A new parameter holding ``tensor`` restricted to ``index`` along ``axis``."""
    data = tensor.detach().index_select(axis, index.to(tensor.device)).clone()
    return nn.Parameter(data, requires_grad=tensor.requires_grad)


def _drop_missing_bias(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` no bias when ``old`` has none (norms take ``bias=`` only in newer torch)."""
    if getattr(old, "bias", None) is None and getattr(new, "bias", None) is not None:
        new.register_parameter("bias", None)


def _finish(
    old: nn.Module, new: nn.Module, keep: torch.Tensor | None = None, axis: int = 0
) -> nn.Module:
    """Copy the training flag, and the buffers shaped like the weight that ``new`` lacks (a
    pruning mask such as ``weight_mask``), cut like the weight (``keep`` along ``axis``)."""
    new.train(old.training)
    weight = getattr(old, "weight", None)
    for name, buf in old._buffers.items():
        if name in new._buffers or buf is None or weight is None or buf.shape != weight.shape:
            continue
        index = keep.to(buf.device) if keep is not None else None
        data = buf.index_select(axis, index).clone() if index is not None else buf.clone()
        new.register_buffer(name, data, persistent=name not in old._non_persistent_buffers_set)
    return new


@dataclass(frozen=True)
class ConvHandler:
    """``nn.Conv1d/2d/3d``. Weight ``(out, in / groups, *kernel)``. A depthwise convolution
    (``groups == in_channels``, possibly with a channel multiplier) couples input channel ``c``
    to output channels ``c*k .. c*k+k-1``; other grouped convolutions are not pruned."""

    def opaque(self, m: nn.Conv2d) -> str | None:
        if m.groups == 1 or m.groups == m.in_channels:
            return None
        return f"grouped convolution (groups={m.groups}): its channels are kept"

    def sizes(self, m: nn.Conv2d) -> dict[str, int]:
        if m.groups > 1:
            return {"out": m.out_channels}
        return {"in": m.in_channels, "out": m.out_channels}

    def coupling(self, m: nn.Conv2d) -> torch.Tensor | None:
        if m.groups == 1:
            return None
        return torch.arange(m.out_channels) // (m.out_channels // m.in_channels)

    def in_axis(self, m: nn.Conv2d, ndim: int) -> int:
        return ndim - len(m.kernel_size) - 1  # 1 for a batch, 0 for one unbatched sample

    out_axis = in_axis

    def params(self, m: nn.Conv2d, dim: str) -> Params:
        if dim == "in":
            return [(m.weight, 1)]
        return [(m.weight, 0)] + ([(m.bias, 0)] if m.bias is not None else [])

    def scales(self, m: nn.Conv2d) -> Params:
        return []

    def slice(self, m: nn.Conv2d, dim: str, keep: torch.Tensor) -> nn.Module:
        cin, cout, groups = m.in_channels, m.out_channels, m.groups
        if dim == "in":
            cin = len(keep)
        else:
            cout = len(keep)
            if groups > 1:  # depthwise: whole blocks of the channel multiplier are kept
                groups = cin = len(keep) // (m.out_channels // m.in_channels)
        new = type(m)(
            cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups,
            m.bias is not None, m.padding_mode, device=m.weight.device, dtype=m.weight.dtype,
        )  # fmt: skip
        new.weight = _param(m.weight, keep, 1 if dim == "in" else 0)
        if m.bias is not None:
            new.bias = _param(m.bias, keep, 0) if dim == "out" else m.bias
        return _finish(m, new, keep, 1 if dim == "in" else 0)


@dataclass(frozen=True)
class LinearHandler:
    """``nn.Linear``: weight ``(out_features, in_features)``, features on the last axis."""

    def opaque(self, m: nn.Linear) -> str | None:
        return None

    def sizes(self, m: nn.Linear) -> dict[str, int]:
        return {"in": m.in_features, "out": m.out_features}

    def coupling(self, m: nn.Linear) -> torch.Tensor | None:
        return None

    def in_axis(self, m: nn.Linear, ndim: int) -> int:
        return ndim - 1

    out_axis = in_axis

    def params(self, m: nn.Linear, dim: str) -> Params:
        if dim == "in":
            return [(m.weight, 1)]
        return [(m.weight, 0)] + ([(m.bias, 0)] if m.bias is not None else [])

    def scales(self, m: nn.Linear) -> Params:
        return []

    def slice(self, m: nn.Linear, dim: str, keep: torch.Tensor) -> nn.Module:
        fin = len(keep) if dim == "in" else m.in_features
        fout = len(keep) if dim == "out" else m.out_features
        new = nn.Linear(fin, fout, m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        new.weight = _param(m.weight, keep, 1 if dim == "in" else 0)
        if m.bias is not None:
            new.bias = _param(m.bias, keep, 0) if dim == "out" else m.bias
        return _finish(m, new, keep, 1 if dim == "in" else 0)


@dataclass(frozen=True)
class NormHandler:
    """``nn.BatchNorm1d/2d/3d`` (channels on axis 1) and ``nn.LayerNorm`` over one trailing
    dim (channels last): one scale and shift per channel, input channel ``c`` is output ``c``."""

    last_axis: bool

    def opaque(self, m: nn.Module) -> str | None:
        shape = getattr(m, "normalized_shape", (0,))
        return None if len(shape) == 1 else f"LayerNorm over {len(shape)} dims is not pruned"

    def sizes(self, m: nn.Module) -> dict[str, int]:
        return {"out": m.normalized_shape[0] if self.last_axis else m.num_features}

    def coupling(self, m: nn.Module) -> torch.Tensor | None:
        return torch.arange(self.sizes(m)["out"])

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return ndim - 1 if self.last_axis else 1

    out_axis = in_axis

    def params(self, m: nn.Module, dim: str) -> Params:
        return [(t, 0) for t in (m.weight, m.bias) if t is not None]

    def scales(self, m: nn.Module) -> Params:
        return [(m.weight, 0)] if m.weight is not None else []

    def slice(self, m: nn.Module, dim: str, keep: torch.Tensor) -> nn.Module:
        ref = next(itertools.chain(m.parameters(), m.buffers()), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        if self.last_axis:
            new = nn.LayerNorm(len(keep), m.eps, m.elementwise_affine, **factory)
        else:
            args = (m.eps, m.momentum, m.affine, m.track_running_stats)
            new = type(m)(len(keep), *args, **factory)
        _drop_missing_bias(m, new)
        for name in ("weight", "bias"):
            if getattr(m, name, None) is not None:
                setattr(new, name, _param(getattr(m, name), keep, 0))
        for name in ("running_mean", "running_var"):
            stat = getattr(m, name, None)
            if stat is not None:
                setattr(new, name, stat.index_select(0, keep.to(stat.device)).clone())
        if getattr(m, "num_batches_tracked", None) is not None:
            new.num_batches_tracked = m.num_batches_tracked.clone()
        return _finish(m, new)


@dataclass(frozen=True)
class EmbeddingHandler:
    """``nn.Embedding``: weight ``(num_embeddings, embedding_dim)``; its input is token ids,
    so it owns only output channels (the last axis of its output)."""

    def opaque(self, m: nn.Embedding) -> str | None:
        return None

    def sizes(self, m: nn.Embedding) -> dict[str, int]:
        return {"out": m.embedding_dim}

    def coupling(self, m: nn.Embedding) -> torch.Tensor | None:
        return None

    def in_axis(self, m: nn.Embedding, ndim: int) -> None:
        return None

    def out_axis(self, m: nn.Embedding, ndim: int) -> int:
        return ndim - 1

    def params(self, m: nn.Embedding, dim: str) -> Params:
        return [(m.weight, 1)]

    def scales(self, m: nn.Embedding) -> Params:
        return []

    def slice(self, m: nn.Embedding, dim: str, keep: torch.Tensor) -> nn.Module:
        new = nn.Embedding(
            m.num_embeddings, len(keep), m.padding_idx, m.max_norm, m.norm_type,
            m.scale_grad_by_freq, m.sparse, device=m.weight.device, dtype=m.weight.dtype,
        )  # fmt: skip
        new.weight = _param(m.weight, keep, 1)
        return _finish(m, new, keep, 1)


Handler = ConvHandler | LinearHandler | NormHandler | EmbeddingHandler

_CONV, _NORM = ConvHandler(), NormHandler(last_axis=False)
HANDLERS: dict[type[nn.Module], Handler] = {
    nn.Conv1d: _CONV,
    nn.Conv2d: _CONV,
    nn.Conv3d: _CONV,
    nn.Linear: LinearHandler(),
    nn.BatchNorm1d: _NORM,
    nn.BatchNorm2d: _NORM,
    nn.BatchNorm3d: _NORM,
    nn.LayerNorm: NormHandler(last_axis=True),
    nn.Embedding: EmbeddingHandler(),
}

#: Layer types whose input and output channels are never pruned, and why.
OPAQUE: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: "MultiheadAttention packs q, k and v into one weight",
    nn.GroupNorm: "GroupNorm normalizes fixed groups of channels",
    nn.ConvTranspose1d: "transposed convolutions are not pruned",
    nn.ConvTranspose2d: "transposed convolutions are not pruned",
    nn.ConvTranspose3d: "transposed convolutions are not pruned",
    nn.RNN: "recurrent layers are not pruned",
    nn.LSTM: "recurrent layers are not pruned",
    nn.GRU: "recurrent layers are not pruned",
    nn.InstanceNorm1d: "InstanceNorm is not pruned",
    nn.InstanceNorm2d: "InstanceNorm is not pruned",
    nn.InstanceNorm3d: "InstanceNorm is not pruned",
    nn.PReLU: "PReLU is not pruned",
}


def handler_for(module: nn.Module) -> Handler | None:
    """The handler of ``module``'s exact type, or None."""
    return HANDLERS.get(type(module))


def opaque_reason(module: nn.Module) -> str | None:
    """Why the channels of ``module`` cannot be pruned (an ``OPAQUE`` type, or a handler's
    refusal such as a grouped convolution), or None when they can."""
    if type(module) in OPAQUE:
        return OPAQUE[type(module)]
    handler = handler_for(module)
    return handler.opaque(module) if handler is not None else None
