"""The ``.cml`` artifact: one safetensors file holding a model's weights and a JSON manifest.

Layout: the tensors of the model's state dict (tied tensors stored once), and in the safetensors
header metadata (string values only):

- ``compactml.manifest``: JSON with the format version, the tool version, the model's source
  (how to build the base architecture), the structural transforms from base to this model
  (``compactml.export.modules``), per-layer compression records, aliases of tied tensors,
  optional metrics, and ``tensor_sha256``, a digest of every tensor's name, dtype, shape and bytes;
- ``compactml.manifest_sha256``: SHA-256 of the manifest bytes;
- ``compactml.signature`` and ``compactml.key_id`` (optional): an ed25519 signature of the
  manifest bytes, which covers the weights through ``tensor_sha256``, and the signer's fingerprint.

Nothing is unpickled when reading; the file bytes are deterministic (no timestamps).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from compactml.checks import check_finite
from compactml.errors import ArtifactError, CompactMLError
from compactml.export.modules import apply_transforms, find_module, plan_transforms
from compactml.export.signing import KeyLike, check_signature, key_id, load_private_key, sign_bytes
from compactml.io import atomic_write_bytes, refuse_overwrite
from compactml.source import build_base, get_path, get_source, set_source

FORMAT = "compactml.artifact"
FORMAT_VERSION = 1
MANIFEST_KEY = "compactml.manifest"
DIGEST_KEY = "compactml.manifest_sha256"
SIGNATURE_KEY = "compactml.signature"
KEY_ID_KEY = "compactml.key_id"
_METADATA_KEYS = {MANIFEST_KEY, DIGEST_KEY, SIGNATURE_KEY, KEY_ID_KEY}


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


def _stored_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def _tool_version() -> str:
    from compactml import __version__

    return __version__


def _json_value(value: Any) -> Any:
    if callable(getattr(value, "tolist", None)):
        return value.tolist()  # numpy and torch scalars or arrays in metrics
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _manifest_text(manifest: dict[str, Any]) -> str:
    """Canonical JSON of the manifest: sorted keys, no spaces, ASCII only."""
    try:
        return json.dumps(
            manifest,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
            default=_json_value,
        )
    except (TypeError, ValueError) as exc:
        raise CompactMLError(
            f"cannot save: the metrics are not plain JSON ({exc}); pass a dict of finite "
            "numbers, strings, lists and dicts"
        ) from exc


def _plan(model: nn.Module, source: dict | None) -> list[dict[str, Any]]:
    """The transforms from the source's base architecture to ``model`` ([] without a source)."""
    if source is None:
        return []
    try:
        base = build_base(source)
    except CompactMLError as exc:
        raise CompactMLError(
            f"cannot save: the model's base architecture cannot be built from its source ({exc})"
        ) from exc
    try:
        return plan_transforms(model, base)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CompactMLError(
            f"cannot save: the model's structure cannot be recorded ({exc}); use modules "
            "listed in MODULE_TYPES (compactml/export/modules.py)"
        ) from exc


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header, so equal content gives equal bytes."""
    try:
        raw = safetensors.torch.save(tensors, metadata=metadata)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompactMLError(f"cannot save the weights ({reason}); check their dtypes") from exc
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


def _metadata(manifest_text: str, sign_key: KeyLike | None) -> dict[str, str]:
    data = manifest_text.encode("utf-8")
    metadata = {MANIFEST_KEY: manifest_text, DIGEST_KEY: hashlib.sha256(data).hexdigest()}
    if sign_key is not None:
        private = load_private_key(sign_key)
        metadata[SIGNATURE_KEY] = sign_bytes(data, private).hex()
        metadata[KEY_ID_KEY] = key_id(private)
    return metadata


def artifact_bytes(
    model: nn.Module, *, metrics: dict | None = None, sign_key: KeyLike | None = None
) -> bytes:
    """The complete ``.cml`` file content for ``model`` (what ``save`` writes), in bytes.

    Deterministic: the same model, metrics and key give the same bytes. ``sign_key`` is an
    ed25519 private key (object, PEM bytes, or path). Raises CompactMLError for NaN/Inf weights.
    """
    check_finite(model)
    source = get_source(model)
    transforms = _plan(model, source)
    tensors, aliases = _stored_tensors(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": _tool_version(),
        "source": source,
        "transforms": transforms,
        "layers": {},
        "aliases": aliases,
        "metrics": metrics,
        "tensor_sha256": tensor_sha256(tensors),
    }
    return _serialize(tensors, _metadata(_manifest_text(manifest), sign_key))


def _write(path: Path, data: bytes) -> Path:
    try:
        return atomic_write_bytes(path, data)
    except OSError as exc:
        raise CompactMLError(
            f"cannot write {path} ({exc.strerror or exc}); check that the folder is writable "
            "and the disk has space"
        ) from exc


def save(
    model: nn.Module,
    path: str | os.PathLike,
    sign_key: KeyLike | None = None,
    *,
    metrics: dict | None = None,
) -> Path:
    """Write ``model`` to ``path`` as a ``.cml`` artifact (atomically); returns the path.

    Refuses to replace the file the model was loaded from, and refuses NaN/Inf weights.
    ``sign_key`` (an ed25519 private key, PEM bytes, or a path) signs the artifact.
    """
    path = Path(path)
    refuse_overwrite(path, get_path(model))
    refuse_overwrite(path, (get_source(model) or {}).get("path"))
    return _write(path, artifact_bytes(model, metrics=metrics, sign_key=sign_key))


def _read_bytes(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if not path.exists():
        raise CompactMLError(f"model file {path} does not exist; check the path")
    if path.is_dir():
        raise CompactMLError(f"{path} is a directory, not a .cml file; give the file's path")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CompactMLError(
            f"cannot read {path} ({exc.strerror or exc}); check the file's permissions"
        ) from exc


def _not_artifact(name: str) -> ArtifactError:
    return ArtifactError(
        f"{name} is not a compactml artifact or is truncated; re-create or re-download it"
    )


def _damaged(name: str, what: str) -> ArtifactError:
    return ArtifactError(f"{name} is damaged ({what}); re-create or re-download it")


def _header_metadata(data: bytes, name: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header, checked to be a compactml one."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if size < 2 or 8 + size > len(data):
        raise _not_artifact(name)
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _not_artifact(name) from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or MANIFEST_KEY not in metadata:
        raise _not_artifact(name)
    for key, value in metadata.items():
        if key not in _METADATA_KEYS or not isinstance(value, str):
            raise _damaged(name, f"unexpected header entry {key[:40]!r}")
    if DIGEST_KEY not in metadata or (SIGNATURE_KEY in metadata) != (KEY_ID_KEY in metadata):
        raise _damaged(name, "header entries are missing")
    return metadata


def _parse_manifest(text: str, name: str) -> dict[str, Any]:
    """The manifest as a dict, with the type of every field checked."""
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise _damaged(name, "manifest is not JSON") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _not_artifact(name)
    version = manifest.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CompactMLError(
            f"{name} has format version {version}, newer than this compactml reads "
            f"({FORMAT_VERSION}); upgrade compactml"
        )
    fields = {
        "format_version": int,
        "source": (dict, type(None)),
        "transforms": list,
        "layers": dict,
        "aliases": dict,
        "metrics": (dict, type(None)),
        "tensor_sha256": str,
    }
    for field, kind in fields.items():
        if field not in manifest or not isinstance(manifest[field], kind):
            raise _damaged(name, f"manifest field {field!r} is missing or invalid")
    return manifest


def _decode(
    data: bytes, name: str, verify_key: KeyLike | None
) -> tuple[dict[str, str], dict[str, Any], dict[str, torch.Tensor]]:
    """Check an artifact's bytes; returns ``(header metadata, manifest, tensors)``."""
    metadata = _header_metadata(data, name)
    text = metadata[MANIFEST_KEY]
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != metadata[DIGEST_KEY]:
        raise _damaged(name, "the manifest does not match its SHA-256")
    if verify_key is not None:
        check_signature(
            text.encode("utf-8"),
            metadata.get(SIGNATURE_KEY),
            metadata.get(KEY_ID_KEY),
            verify_key,
            name,
        )
    manifest = _parse_manifest(text, name)
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types for any bad header
        raise _not_artifact(name) from exc
    if tensor_sha256(tensors) != manifest["tensor_sha256"]:
        raise _damaged(name, "the tensor data does not match its SHA-256")
    return metadata, manifest, tensors


def _owner(model: nn.Module, key: str) -> tuple[nn.Module | None, str]:
    module_name, _, leaf = key.rpartition(".")
    return find_module(model, module_name), leaf


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias the very same parameter or buffer as its target again (tied weights)."""
    for alias, target in aliases.items():
        (owner, leaf), (source, source_leaf) = _owner(model, alias), _owner(model, target)
        if owner is None or source is None:
            continue
        pairs = ((owner._parameters, source._parameters), (owner._buffers, source._buffers))
        for table, source_table in pairs:
            if leaf in table and source_leaf in source_table:
                table[leaf] = source_table[source_leaf]


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict, name: str) -> None:
    """Load the stored tensors into ``model`` strictly, keeping their dtypes, and retie aliases."""
    state = dict(tensors)
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in tensors:
            raise _damaged(name, f"alias {alias!r} names no stored tensor")
        state[alias] = tensors[target]
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(state))]
    problems += [f"unexpected {k}" for k in sorted(set(state) - set(expected))]
    problems += [
        f"{k} is {tuple(state[k].shape)}, not {expected[k]}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != expected[k]
    ]
    if problems:
        raise CompactMLError(
            f"the weights in {name} do not fit the architecture they are loaded into "
            f"({'; '.join(problems[:3])}); pass model= with the architecture it was saved from"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].strip()
        raise CompactMLError(
            f"the weights in {name} do not fit the architecture they are loaded into "
            f"({reason}); pass model= with the architecture it was saved from"
        ) from exc
    _retie(model, aliases)


def load(
    path: str | os.PathLike, verify_key: KeyLike | None = None, *, model: nn.Module | None = None
) -> nn.Module:
    """Read a ``.cml`` artifact and return the model, in eval mode, with its tensors on the CPU.

    Checks the manifest and tensor digests, and the signature when ``verify_key`` (an ed25519
    public key, PEM bytes, or a path) is given. The architecture is rebuilt from the recorded
    source, or from ``model`` (an instance of the base or saved architecture, filled in place),
    then the recorded transforms are applied and the weights loaded strictly.
    """
    name = str(path)
    _, manifest, tensors = _decode(_read_bytes(path), name, verify_key)
    skeleton = model if model is not None else build_base(manifest["source"])
    try:
        skeleton = apply_transforms(skeleton, manifest["transforms"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(
            f"cannot rebuild the architecture of {name} ({exc}); pass model= with the "
            "architecture it was saved from, or re-create the artifact"
        ) from exc
    _fill(skeleton, tensors, manifest["aliases"], name)
    source = manifest["source"] if manifest["source"] is not None else get_source(skeleton)
    set_source(skeleton, source, path=path)
    return skeleton.eval()


def read_manifest(path: str | os.PathLike, verify_key: KeyLike | None = None) -> dict[str, Any]:
    """The checked manifest of an artifact (digests, and signature when a key is given)."""
    return _decode(_read_bytes(path), str(path), verify_key)[1]


def sign_artifact(src: str | os.PathLike, dst: str | os.PathLike, key: KeyLike) -> Path:
    """Write a copy of artifact ``src`` to ``dst`` signed with the ed25519 private ``key``.

    The tensors and manifest are unchanged; ``src`` is checked first, and never overwritten.
    """
    refuse_overwrite(dst, src)
    private = load_private_key(key)
    metadata, _, tensors = _decode(_read_bytes(src), str(src), None)
    signed = _metadata(metadata[MANIFEST_KEY], private)
    return _write(Path(dst), _serialize(tensors, signed))


def verify_artifact(path: str | os.PathLike, key: KeyLike) -> dict[str, Any]:
    """The manifest of ``path`` if it is intact and signed by ``key``; raises otherwise."""
    return read_manifest(path, verify_key=key)
