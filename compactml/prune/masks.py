"""Pruning masks as buffers: a pruned layer carries a persistent bool ``weight_mask``.

The mask has the shape of the layer's weight, True where the weight is kept. Attaching one
zeroes the pruned weights; attaching another to an already-masked layer keeps the intersection,
so a pruned weight never comes back. During fine-tuning :func:`keep_masks` re-applies the
masks after every optimizer step, so pruned weights stay exactly zero.

Because the mask is a persistent buffer, ``compactml.save`` records it (an ``add_tensor``
transform) and ``compactml.load`` restores it: a saved pruned model can be fine-tuned further.
:func:`remove_masks` drops the buffers and keeps the zeros (a plain dense model).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from compactml.errors import CompactMLError

MASK = "weight_mask"
#: Layer types whose weight :func:`sparsity` reports even without a mask.
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def get_mask(layer: nn.Module) -> torch.Tensor | None:
    """The layer's keep-mask, or None when it has none."""
    return layer._buffers.get(MASK)


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer of ``model`` that carries a mask."""
    return [(name, m) for name, m in model.named_modules() if get_mask(m) is not None]


def attach_mask(layer: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """Give ``layer`` (changed in place) the keep-``mask``, combined with the mask it already
    has (a weight pruned before stays pruned), and zero its pruned weights. Returns the
    combined mask."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise CompactMLError(f"cannot mask a {type(layer).__name__}: it has no weight tensor")
    if tuple(mask.shape) != tuple(weight.shape):
        raise CompactMLError(
            f"mask shape {tuple(mask.shape)} differs from the weight's {tuple(weight.shape)}"
        )
    mask = mask.to(device=weight.device, dtype=torch.bool)
    old = get_mask(layer)
    if old is not None:
        mask = mask & old.to(mask.device)
    layer.register_buffer(MASK, mask.contiguous(), persistent=True)
    with torch.no_grad():
        weight.masked_fill_(~mask, 0.0)  # +0.0 (a multiply would leave -0.0 for negatives)
    return mask


def apply_masks(model: nn.Module) -> nn.Module:
    """Zero, in place, every masked weight of ``model`` (returns the model)."""
    with torch.no_grad():
        for _, layer in masked_layers(model):
            layer.weight.masked_fill_(~get_mask(layer), 0.0)
    return model


def keep_masks(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Re-apply ``model``'s masks after every step of ``optimizer`` (a step post-hook), so
    pruned weights stay zero however the optimizer moves them. Call ``.remove()`` on the
    returned handle to stop. Masks attached later are honoured too."""

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        apply_masks(model)

    return optimizer.register_step_post_hook(hook)


def remove_masks(model: nn.Module) -> nn.Module:
    """Drop every mask buffer of ``model`` in place, after zeroing the masked weights: the
    zeros stay, nothing keeps them zero any more. Returns the model."""
    apply_masks(model)
    for _, layer in masked_layers(model):
        del layer._buffers[MASK]
    return model


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """Share of exactly-zero weights: per layer (``layers``: name -> fraction), and over all
    those layers together (``total``, from ``zeros`` of ``numel`` weights)."""

    layers: dict[str, float]
    zeros: int
    numel: int

    @property
    def total(self) -> float:
        """Zero weights over all reported weights (0.0 when there are none)."""
        return self.zeros / self.numel if self.numel else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"total": ..., "layers": {...}}`` (rounded to 6 digits)."""
        return {
            "total": round(self.total, 6),
            "layers": {k: round(v, 6) for k, v in self.layers.items()},
        }


def sparsity(model: nn.Module) -> Sparsity:
    """The sparsity of every masked layer and every Linear/Conv1d/Conv2d layer of ``model``,
    counted as exactly-zero weight entries (so it also measures a model after
    :func:`remove_masks`)."""
    layers: dict[str, float] = {}
    zeros = numel = 0
    for name, layer in model.named_modules():
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            continue
        if get_mask(layer) is None and type(layer) not in PRUNABLE:
            continue
        count = int((weight.detach() == 0).sum())
        layers[name] = count / weight.numel()
        zeros += count
        numel += weight.numel()
    return Sparsity(layers, zeros, numel)
