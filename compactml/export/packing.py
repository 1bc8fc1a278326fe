"""Small tensors of a ``.cml`` stored together: one ``uint8`` blob instead of many entries.

Every tensor in a safetensors file costs an index entry in the header (its name, dtype, shape
and offsets: 60 to 100 bytes), as much as a 16-element float bias holds. A quantized layer adds
a few such tensors (scales, zero points, the bias), so on a small model the index can outgrow
the weights. ``pack`` therefore moves every stored tensor of at most ``PACK_MAX_BYTES`` bytes
(a bias, a scale, the bitmask of a small sparse layer) into one stored tensor, ``::packed``:
their raw bytes (little-endian, as safetensors stores them) concatenated in name order (Unicode
code point order), with no padding between them. Larger tensors stay separate, readable by any
safetensors reader.

The manifest's ``encodings`` says, per packed tensor, what it is::

    {"fc.bias": {"kind": "packed", "dtype": "float32", "shape": [16]}}

and its place in the blob follows from the order: the tensors before it in name order. On
load ``unpack`` checks the entries (known dtype, sizes >= 0) and that their sizes add up to
exactly the blob's bytes before copying anything out, so a doctored layout is refused and can
make ``load`` allocate no more than the blob's size.
"""

from __future__ import annotations

from typing import Any

import torch

PACKED_NAME = "::packed"
PACKED_KIND = "packed"
PACK_MAX_BYTES = 4096  # an index entry is >= 2% of a tensor this size; bigger ones stay apart
# The dtypes a tensor may have to be packed: whole bytes per element, no sub-byte codes.
PACKABLE: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_FIELDS = {"kind", "dtype", "shape"}


def _dtype_name(tensor: torch.Tensor) -> str | None:
    name = str(tensor.dtype).removeprefix("torch.")
    return name if PACKABLE.get(name) == tensor.dtype else None


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat ``uint8`` tensor (a view when it is contiguous)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def pack(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """``(stored tensors, encodings)``: the tensors of at most ``PACK_MAX_BYTES`` bytes with a
    packable dtype moved into one ``::packed`` blob (when there are two or more of them).

    Deterministic: the blob holds the packed tensors in name order.
    """
    small = sorted(
        name
        for name, tensor in tensors.items()
        if _dtype_name(tensor) is not None
        and tensor.numel() * tensor.element_size() <= PACK_MAX_BYTES
    )
    if len(small) < 2:  # one tensor in a blob saves no index entry
        return dict(tensors), {}
    if PACKED_NAME in tensors:
        raise ValueError(f"a tensor is named {PACKED_NAME!r}, which the format reserves")
    stored = {name: tensor for name, tensor in tensors.items() if name not in small}
    stored[PACKED_NAME] = torch.cat([_raw(tensors[name]) for name in small])
    encodings = {
        name: {
            "kind": PACKED_KIND,
            "dtype": _dtype_name(tensors[name]),
            "shape": list(tensors[name].shape),
        }
        for name in small
    }
    return stored, encodings


def _layout(entries: dict[str, Any], size: int) -> list[tuple[str, torch.dtype, list, int, int]]:
    """``[(name, dtype, shape, start, end)]`` in blob order, after checking every entry and
    that the sizes add up to exactly ``size`` bytes; raises ValueError."""
    layout, start = [], 0
    for name in sorted(entries):
        entry = entries[name]
        if not isinstance(entry, dict) or set(entry) != _FIELDS:
            fields = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"the packed encoding of {name} has fields {fields}")
        dtype = PACKABLE.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise ValueError(f"the packed encoding of {name} has an unknown dtype")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"the packed encoding of {name} has an invalid shape")
        numel = 1
        for n in shape:  # Python ints: a doctored shape cannot overflow
            numel *= n
        end = start + numel * dtype.itemsize
        if end > size:
            raise ValueError(f"the packed tensors run past the end of {PACKED_NAME} at {name}")
        layout.append((name, dtype, shape, start, end))
        start = end
    if start != size:
        raise ValueError(f"{PACKED_NAME} holds {size} bytes, but its tensors take {start}")
    return layout


def unpack(stored: dict[str, torch.Tensor], entries: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The packed tensors named by ``entries`` (the ``packed`` encodings), copied out of the
    ``::packed`` blob; raises ValueError for a missing blob or a layout that does not fit it."""
    if not entries:
        return {}
    blob = stored.get(PACKED_NAME)
    if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"{PACKED_NAME} is missing or not a uint8 vector")
    out = {}
    for name, dtype, shape, start, end in _layout(entries, blob.numel()):
        raw = blob[start:end].clone()  # a copy is aligned for any dtype
        if dtype == torch.bool and bool((raw > 1).any()):
            raise ValueError(f"the packed bool tensor {name} holds bytes other than 0 and 1")
        out[name] = raw.view(dtype).reshape(shape)
    return out
