"""The ``.cml`` artifact: one safetensors file holding a model's weights and a JSON manifest.

Layout: the tensors of the model's state dict (tied tensors stored once, sparse ones as bitmask
and values, small ones packed into one blob), and in the safetensors header metadata the
manifest (compressed when that is shorter), an optional ed25519 signature of it, and a digest
of the whole metadata (``compactml.export.manifest``). The manifest records the model's source
(how to build the base architecture), the structural transforms from base to this model
(``compactml.export.transforms``), aliases of tied tensors, how tensors are encoded and packed,
optional metrics, and ``tensor_sha256``, a digest of every stored tensor's name, dtype, shape
and bytes, so the signature covers the weights too.

Nothing is unpickled when reading; the file bytes are deterministic (no timestamps).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors  # safetensors: no pickle involved
from torch import nn

from compactml.checks import check_finite
from compactml.config import HISTORY_ATTR, history
from compactml.errors import ArtifactError, CompactMLError, first_line
from compactml.export.encodings import decode, encode
from compactml.export.manifest import (
    FORMAT,
    FORMAT_VERSION,
    KEY_ID_KEY,
    SIGNATURE_KEY,
    damaged,
    header_metadata,
    is_artifact,
    manifest_text,
    not_artifact,
    parse_manifest,
    read_header,
    stored_manifest,
)
from compactml.export.packing import pack
from compactml.export.planning import plan_transforms
from compactml.export.signing import KeyLike, check_signature, key_id, load_private_key, sign_bytes
from compactml.export.tensors import serialize, stored_tensors, tensor_sha256
from compactml.export.transforms import apply_transforms, find_module
from compactml.io import atomic_write_bytes, refuse_overwrite
from compactml.source import build_base, get_path, get_source, set_source
from compactml.task import tensor_nbytes

# Set on a model loaded without trust_factory from an artifact whose source is a factory file,
# so that saving it does not run that file either.
UNTRUSTED_ATTR = "_compactml_untrusted_factory"
# Slack for the modules that transforms build beyond the stored tensors (non-persistent buffers).
_BUILD_SLACK_BYTES = 64 * 2**20


def _tool_version() -> str:
    from compactml import __version__

    return __version__


def _plan(model: nn.Module, source: dict | None) -> list[dict[str, Any]]:
    """The transforms from the source's base architecture to ``model`` ([] without a source)."""
    if source is None:
        return []
    if getattr(model, UNTRUSTED_ATTR, False):
        raise CompactMLError(
            f"cannot save: the model was loaded without trust_factory from an artifact whose "
            f"architecture comes from {source.get('path')}, and saving would run that file; "
            "load it with trust_factory=True (CLI: --trust-factory) if you trust the file"
        )
    try:
        base = build_base(source, trust_factory=True)  # the caller already ran or trusted it
    except CompactMLError as exc:
        raise CompactMLError(
            f"cannot save: the model's base architecture cannot be built from its source ({exc})"
        ) from exc
    try:
        return plan_transforms(model, base)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CompactMLError(
            f"cannot save: the model's structure cannot be recorded ({first_line(exc)}); use "
            "modules listed in MODULE_TYPES (compactml/export/modules.py)"
        ) from exc


def _metadata(text: str, sign_key: KeyLike | None) -> dict[str, str]:
    """The header metadata for manifest ``text``, signed when ``sign_key`` is given."""
    if sign_key is None:
        return header_metadata(text)
    private = load_private_key(sign_key)
    return header_metadata(text, sign_bytes(text.encode("utf-8"), private).hex(), key_id(private))


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
    tensors, aliases = stored_tensors(model)
    tensors, encodings = encode(tensors)
    tensors, packed = pack(tensors)
    encodings |= packed
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": _tool_version(),
        "source": source,
        "transforms": transforms,
        "history": history(model),
        "aliases": aliases,
        "encodings": encodings,
        "metrics": metrics,
        "tensor_sha256": tensor_sha256(tensors),
    }
    try:
        text = manifest_text(manifest)
    except (TypeError, ValueError) as exc:
        raise CompactMLError(
            f"cannot save: the metrics are not plain JSON ({first_line(exc)}); pass a dict of "
            "finite numbers, strings, lists and dicts"
        ) from exc
    return serialize(tensors, _metadata(text, sign_key))


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


def _decode(
    data: bytes, name: str, verify_key: KeyLike | None
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """Check an artifact's bytes; returns ``(manifest text, manifest, stored tensors)``."""
    metadata = read_header(data, name)
    text = stored_manifest(metadata, name)
    if verify_key is not None:
        check_signature(
            text.encode("utf-8"),
            metadata.get(SIGNATURE_KEY),
            metadata.get(KEY_ID_KEY),
            verify_key,
            name,
        )
    manifest = parse_manifest(text, name)
    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for any bad header
        raise not_artifact(name) from exc
    if tensor_sha256(tensors) != manifest["tensor_sha256"]:
        raise damaged(name, "the tensor data does not match its SHA-256")
    return text, manifest, tensors


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
            raise damaged(name, f"alias {alias!r} names no stored tensor")
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


def _rebuild(
    manifest: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    model: nn.Module | None,
    trust_factory: bool,
    name: str,
) -> nn.Module:
    """The model described by a checked manifest, filled with ``tensors``."""
    skeleton = model if model is not None else build_base(manifest["source"], trust_factory)
    # Transforms may build new modules; they can hold no more than the file stores (plus
    # buffers that are not stored), so a doctored shape cannot make load allocate terabytes.
    limit = 2 * tensor_nbytes(tensors) + _BUILD_SLACK_BYTES
    skeleton = apply_transforms(skeleton, manifest["transforms"], max_new_bytes=limit)
    _fill(skeleton, tensors, manifest["aliases"], name)
    return skeleton


def load(
    path: str | os.PathLike,
    verify_key: KeyLike | None = None,
    *,
    model: nn.Module | None = None,
    trust_factory: bool = False,
) -> nn.Module:
    """Read a ``.cml`` artifact and return the model, in eval mode, with its tensors on the CPU.

    Checks the header and tensor digests, and the signature when ``verify_key`` (an ed25519
    public key, PEM bytes, or a path) is given. The architecture is rebuilt from the recorded
    source, or from ``model`` (an instance of the base or saved architecture, filled in place),
    then the recorded transforms are applied and the weights loaded strictly. A source that is
    a Python factory file is run only with ``trust_factory=True`` (see ``build_base``).
    """
    name = str(path)
    _, manifest, stored = _decode(_read_bytes(path), name, verify_key)
    try:
        tensors = decode(stored, manifest["encodings"])
    except ValueError as exc:
        raise damaged(name, first_line(exc)) from exc
    # A factory the caller did not trust may not run later either (when the model is saved),
    # unless the skeleton they passed was itself built by that very factory.
    untrusted = (manifest["source"] or {}).get("kind") == "factory" and not trust_factory
    built_by_it = model is not None and get_source(model) == manifest["source"]
    untrusted = untrusted and not (built_by_it and not getattr(model, UNTRUSTED_ATTR, False))
    try:
        skeleton = _rebuild(manifest, tensors, model, trust_factory, name)
    except CompactMLError:
        raise
    except Exception as exc:  # a hand-edited manifest can make any builder fail
        raise ArtifactError(
            f"cannot rebuild the architecture of {name} ({type(exc).__name__}: "
            f"{first_line(exc)}); pass model= with the architecture it was saved from, or "
            "re-create the artifact"
        ) from exc
    source = manifest["source"] if manifest["source"] is not None else get_source(skeleton)
    set_source(skeleton, source, path=path)
    object.__setattr__(skeleton, UNTRUSTED_ATTR, untrusted)
    object.__setattr__(skeleton, HISTORY_ATTR, manifest["history"])
    return skeleton.eval()


def read_manifest(path: str | os.PathLike, verify_key: KeyLike | None = None) -> dict[str, Any]:
    """The checked manifest of an artifact (digests, and signature when a key is given)."""
    return _decode(_read_bytes(path), str(path), verify_key)[1]


def _is_key_path(key: KeyLike) -> bool:
    """True when ``key`` names a key file (not a key object or PEM text)."""
    if isinstance(key, str):
        return not key.lstrip().startswith("-----BEGIN")
    return isinstance(key, os.PathLike)


def _check_sign_output(src: str | os.PathLike, dst: Path, key: KeyLike) -> None:
    """Refuse a signing output that would replace the input, the key, or any non-artifact."""
    refuse_overwrite(dst, src)
    if _is_key_path(key):
        refuse_overwrite(dst, key)
    if dst.is_file() and not is_artifact(dst):
        raise CompactMLError(
            f"{dst} exists and is not a compactml artifact; choose a new output path (-o) or "
            "delete that file first"
        )


def sign_artifact(src: str | os.PathLike, dst: str | os.PathLike, key: KeyLike) -> Path:
    """Write a copy of artifact ``src`` to ``dst`` signed with the ed25519 private ``key``.

    The tensors and manifest are unchanged; ``src`` is checked first. ``dst`` may not be
    ``src``, the key file, or an existing file that is not a ``.cml`` artifact.
    """
    dst = Path(dst)
    _check_sign_output(src, dst, key)
    private = load_private_key(key)
    text, _, tensors = _decode(_read_bytes(src), str(src), None)
    return _write(dst, serialize(tensors, _metadata(text, private)))


def verify_artifact(path: str | os.PathLike, key: KeyLike) -> dict[str, Any]:
    """The manifest of ``path`` if it is intact and signed by ``key``; raises otherwise."""
    return read_manifest(path, verify_key=key)
