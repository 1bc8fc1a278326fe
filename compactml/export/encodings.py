"""Compact storage of sparse tensors in a ``.cml``: a bitmask plus the packed remaining values.

A pruned layer's weight is mostly one value (zero for a float weight; the zero-point code for a
quantized one). Stored densely it costs as much as an unpruned layer, so the artifact writes it
as two tensors instead:

- ``<name>::mask``: a ``uint8`` bitmask, one bit per element in row-major order (``numpy``'s
  little-endian bit order), set where the element differs from the fill value;
- ``<name>::values``: the elements where the bit is set, in order, with the tensor's dtype.

A ``bool`` tensor (a pruning mask buffer) is stored as its bitmask alone. When two tensors have
the same bitmask (a weight and its mask buffer), the mask is stored once and referenced.

The manifest's ``encodings`` entry says, per logical tensor, how to rebuild it::

    {"fc.weight": {"kind": "sparse", "shape": [4, 8], "dtype": "float32",
                   "fill": 0, "mask": "fc.weight::mask"},
     "fc.weight_mask": {"kind": "bits", "shape": [4, 8], "mask": "fc.weight::mask"}}

``fill`` is the fill value's bit pattern as an unsigned integer; the values keep their exact
bits (NaN payloads included). For a float tensor the fill is zero and a ``-0.0`` element is
read back as ``0.0``, an equal value (``torch.equal`` holds); everything else is bit-exact. A
tensor is stored sparsely only when that saves at least a tenth of its bytes, so a dense layer
never gets bigger. Decoding checks every count against
the stored bytes before allocating anything, so a doctored manifest cannot make ``load``
allocate more than a small multiple of the file size.

Small stored tensors (bitmasks and values included) are then packed into one blob
(``compactml.export.packing``); ``decode`` unpacks those ``packed`` entries first.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from compactml.export.packing import PACKED_KIND, PACKED_NAME, unpack

MASK_SUFFIX = "::mask"
VALUES_SUFFIX = "::values"
KINDS = ("sparse", "bits")
# Integer views of each element width, to compare elements bit for bit.
_BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MIN_ELEMENTS = 64  # smaller tensors are not worth the extra header entries
_MIN_SAVING = 0.1  # store sparsely only when it saves at least this share of the bytes


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as integers of the same width (bit patterns), flattened."""
    flat = tensor.reshape(-1)
    view = _BITS_VIEW[tensor.element_size()]
    return flat.view(view) if flat.dtype != view else flat


def _fill_value(bits: torch.Tensor) -> int:
    """The most common bit pattern for byte-wide tensors (e.g. the zero-point code of pruned
    8-bit weights); zero otherwise (a pruned float weight)."""
    if bits.dtype == torch.uint8:
        return int(torch.bincount(bits, minlength=256).argmax())
    return 0


def _pack(keep: torch.Tensor) -> np.ndarray:
    return np.packbits(keep.numpy(), bitorder="little")


def _encoding_for(tensor: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """``(fill, keep)`` when storing ``tensor`` sparsely saves enough, else None."""
    if tensor.numel() < _MIN_ELEMENTS or tensor.element_size() not in _BITS_VIEW:
        return None
    bits = _bits(tensor)
    if tensor.dtype == torch.bool:
        return 0, bits != 0
    if tensor.is_floating_point():
        fill, keep = 0, tensor.reshape(-1) != 0  # -0.0 is stored as 0.0: an equal value
    else:
        fill = _fill_value(bits)  # non-negative, in the domain of the integer view
        keep = bits != fill
    dense = tensor.numel() * tensor.element_size()
    sparse = (tensor.numel() + 7) // 8 + int(keep.sum()) * tensor.element_size()
    if sparse > (1 - _MIN_SAVING) * dense:
        return None
    return fill, keep


def encode(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """``(stored tensors, encodings)``: sparse and boolean tensors as bitmask (+ values).

    Deterministic: the same tensors give the same stored tensors and encodings. Each distinct
    bitmask is stored once, under the name of the first tensor (in name order) that has it.
    """
    stored: dict[str, torch.Tensor] = {}
    encodings: dict[str, dict[str, Any]] = {}
    masks: dict[bytes, str] = {}  # digest of a packed mask -> its stored name
    for name in sorted(tensors):
        tensor = tensors[name]
        found = _encoding_for(tensor)
        if found is None:
            stored[name] = tensor
            continue
        fill, keep = found
        packed = _pack(keep)
        key = hashlib.sha256(packed.tobytes() + tensor.numel().to_bytes(8, "little")).digest()
        if key not in masks:
            masks[key] = name + MASK_SUFFIX
            stored[masks[key]] = torch.from_numpy(packed)
        entry: dict[str, Any] = {"shape": list(tensor.shape), "mask": masks[key]}
        if tensor.dtype == torch.bool:
            encodings[name] = {"kind": "bits", **entry}
            continue
        stored[name + VALUES_SUFFIX] = tensor.reshape(-1)[keep].clone()
        encodings[name] = {
            "kind": "sparse",
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "fill": fill,
            **entry,
        }
    return stored, encodings


def _check(name: str, entry: Any, stored: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor]:
    """``(numel, keep)`` for one encoding entry, after checking it; raises ValueError."""
    if not isinstance(entry, dict) or entry.get("kind") not in KINDS:
        raise ValueError(f"the encoding of {name} is not one of {(*KINDS, PACKED_KIND)}")
    fields = {"kind", "shape", "mask"} | ({"dtype", "fill"} if entry["kind"] == "sparse" else set())
    if set(entry) != fields:
        raise ValueError(f"the encoding of {name} has fields {sorted(entry)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"the encoding of {name} has an invalid shape")
    mask = stored.get(entry["mask"]) if isinstance(entry["mask"], str) else None
    if mask is None or mask.dtype != torch.uint8 or mask.dim() != 1:
        raise ValueError(f"the bitmask of {name} is missing or not a uint8 vector")
    numel = int(np.prod(shape, dtype=np.int64))
    if (numel + 7) // 8 != mask.numel():
        raise ValueError(f"the bitmask of {name} does not have one bit per element")
    keep = torch.from_numpy(np.unpackbits(mask.numpy(), count=numel, bitorder="little"))
    return numel, keep.bool()


def _sparse(name: str, entry: dict, stored: dict, numel: int, keep: torch.Tensor) -> torch.Tensor:
    dtype = getattr(torch, entry["dtype"], None) if isinstance(entry["dtype"], str) else None
    if not isinstance(dtype, torch.dtype) or dtype.itemsize not in _BITS_VIEW:
        raise ValueError(f"the encoding of {name} has an unknown dtype")
    values = stored.get(name + VALUES_SUFFIX)
    if values is None or values.dtype != dtype or values.dim() != 1:
        raise ValueError(f"the values of {name} are missing or have the wrong dtype")
    if values.numel() != int(keep.sum()):
        raise ValueError(f"the values of {name} do not match its bitmask")
    fill = entry["fill"]
    if type(fill) is not int or not 0 <= fill < 2 ** (8 * dtype.itemsize):
        raise ValueError(f"the fill value of {name} is not a bit pattern of its dtype")
    view = _BITS_VIEW[dtype.itemsize]
    if fill >= 2 ** (8 * dtype.itemsize - 1) and view != torch.uint8:
        fill -= 2 ** (8 * dtype.itemsize)
    out = torch.full((numel,), fill, dtype=view)
    out[keep] = _bits(values)
    return out.view(dtype) if dtype != view else out


def _is_packed(entry: Any) -> bool:
    return isinstance(entry, dict) and entry.get("kind") == PACKED_KIND


def decode(stored: dict[str, torch.Tensor], encodings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The logical tensors from the stored ones; raises ValueError for anything inconsistent
    (a missing or mis-sized bitmask, values tensor or packed blob, an unknown kind or dtype).

    Packed tensors are unpacked first: they may be the bitmasks and values of sparse ones.
    """
    packed = {name: entry for name, entry in encodings.items() if _is_packed(entry)}
    if packed:
        both = sorted(set(packed) & set(stored))
        if both:
            raise ValueError(f"{both[0]} is stored both densely and packed")
        unpacked = unpack(stored, packed)
        stored = {k: v for k, v in stored.items() if k != PACKED_NAME} | unpacked
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for name, entry in encodings.items():
        if name in packed:
            continue
        numel, keep = _check(name, entry, stored)
        used.add(entry["mask"])
        if entry["kind"] == "bits":
            tensor = keep
        else:
            tensor = _sparse(name, entry, stored, numel, keep)
            used.add(name + VALUES_SUFFIX)
        if name in stored:
            raise ValueError(f"{name} is stored both densely and encoded")
        out[name] = tensor.reshape(entry["shape"])
    for name, tensor in stored.items():
        if name in used:
            continue
        if name.endswith((MASK_SUFFIX, VALUES_SUFFIX)) or name == PACKED_NAME:
            raise ValueError(f"{name} belongs to no encoded tensor")
        out[name] = tensor
    return out
