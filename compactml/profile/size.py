"""Model size: parameter counts, zeros, and bytes as stored.

The total ``stored_bytes`` of a model is the length of its serialized ``.cml`` artifact
(:func:`compactml.export.artifact.artifact_bytes`), never an estimate from parameter counts.
Per-layer bytes are the bytes of each module's own parameters and persistent buffers as they
are held (``numel * element_size``; int4 weights packed two per byte count as packed), with a
tensor shared between modules (tied embeddings) counted once, for the first module that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compactml.task import tensor_nbytes


@dataclass(frozen=True)
class LayerStorage:
    """What one module stores itself (not its children): counts, bytes and main dtype."""

    params: int
    nonzero_params: int
    stored_bytes: int
    dtype: torch.dtype | None


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(params, nonzero_params)``: elements of all ``nn.Parameter`` s, shared ones once."""
    params = nonzero = 0
    with torch.no_grad():
        for param in model.parameters():
            params += param.numel()
            nonzero += int(torch.count_nonzero(param))
    return params, nonzero


def own_tensors(module: nn.Module) -> list[tuple[torch.Tensor, bool]]:
    """A module's own parameters and persistent buffers (no children), as ``(tensor, is_param)``."""
    tensors = [(p, True) for p in module.parameters(recurse=False)]
    skipped = module._non_persistent_buffers_set
    for name, buf in module.named_buffers(recurse=False):
        if name not in skipped and buf is not None:
            tensors.append((buf, False))
    return tensors


def layer_storage(model: nn.Module) -> dict[str, LayerStorage]:
    """Per module name, what it stores itself; a tensor shared between modules counts once."""
    seen: set[int] = set()
    result: dict[str, LayerStorage] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            params = nonzero = nbytes = 0
            largest: torch.Tensor | None = None
            for tensor, is_param in own_tensors(module):
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                nbytes += tensor_nbytes(tensor)
                if is_param:
                    params += tensor.numel()
                    nonzero += int(torch.count_nonzero(tensor))
                if largest is None or tensor.numel() > largest.numel():
                    largest = tensor
            dtype = largest.dtype if largest is not None else None
            result[name] = LayerStorage(params, nonzero, nbytes, dtype)
    return result


def stored_bytes(model: nn.Module) -> int:
    """Size in bytes of the model's ``.cml`` artifact, measured by serializing it."""
    from compactml.export.artifact import artifact_bytes

    return len(artifact_bytes(model))


def dominant_dtype(storage: dict[str, LayerStorage]) -> torch.dtype:
    """The dtype holding most stored bytes across layers (float32 for a model with no weights)."""
    totals: dict[torch.dtype, int] = {}
    for layer in storage.values():
        if layer.dtype is not None:
            totals[layer.dtype] = totals.get(layer.dtype, 0) + layer.stored_bytes
    return max(totals, key=totals.__getitem__) if totals else torch.float32
