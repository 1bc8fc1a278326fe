"""How a model's tensors are stored in a ``.cml`` file: tied tensors once, canonical bytes.

``stored_tensors`` picks the tensors of a state dict to write (a tensor tied to another is
recorded as an alias instead), ``serialize`` writes them as safetensors with a header in a fixed
order (equal content gives equal bytes), and ``tensor_sha256`` is the layout-independent digest
of the tensors that the manifest records.
"""

from __future__ import annotations

import hashlib
import json

import safetensors.torch
import torch
from torch import nn

from compactml.errors import CompactMLError, first_line


def tensor_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 over tensors in name order: each name, dtype, shape and raw bytes.

    The digest depends on the data only, not on how a file lays it out.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        meta = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode("utf-8")
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        digest.update(len(meta).to_bytes(8, "little") + meta)
        digest.update(raw.nbytes.to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


def stored_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with tied tensors stored once: ``(tensors, {alias: stored name})``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            raise CompactMLError(
                f"cannot save: state {name} is a {type(tensor).__name__}, not a tensor; "
                "store module state as tensors (buffers)"
            )
        if "::" in name:
            raise CompactMLError(
                f"cannot save: state {name} has '::' in its name, which .cml files reserve for "
                "encoded tensors; rename that parameter or buffer"
            )
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        view += (tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() > 0 and view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        tensors[name] = tensor
    # safetensors refuses tensors that share memory without being the same tensor: copy those.
    owners: dict[tuple, int] = {}
    for tensor in tensors.values():
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        owners[key] = owners.get(key, 0) + 1
    out = {}
    for name, tensor in tensors.items():
        shared = owners[(tensor.device, tensor.untyped_storage().data_ptr())] > 1
        out[name] = (tensor.clone() if shared else tensor).detach().cpu().contiguous()
    return out, aliases


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header, so equal content gives equal bytes."""
    try:
        raw = safetensors.torch.save(tensors, metadata=metadata)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CompactMLError(
            f"cannot save the weights ({first_line(exc)}); check their dtypes"
        ) from exc
    # safetensors writes the metadata in hash order; rewrite the header in a fixed order.
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda item: (item[1]["data_offsets"], item[0]),
    )
    canonical = {"__metadata__": dict(sorted(header["__metadata__"].items())), **dict(entries)}
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + raw[8 + size :]
