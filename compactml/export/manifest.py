"""The header of a ``.cml`` artifact: its metadata entries and the manifest, written and checked.

The safetensors header metadata of an artifact holds string values only:

- the manifest, under one of two keys: ``compactml.manifest``, canonical JSON (see
  ``manifest_text``) with the format version, the tool version, the model's source, the
  transforms from base to model, per-layer records, aliases of tied tensors, how encoded and
  packed tensors are stored (``encodings``), optional metrics, and ``tensor_sha256`` (a digest
  of the stored tensors); or ``compactml.manifest_zlib``, that same text compressed with zlib
  (level 9, with the preset dictionary ``MANIFEST_ZDICT`` of ``compactml.export.manifest_dict``)
  and written in base85 (``base64.b85encode``), used whenever it is shorter;
- ``compactml.signature`` and ``compactml.key_id`` (optional): an ed25519 signature of the
  manifest text (the JSON bytes, uncompressed, so the signature does not depend on the zlib
  library; 128 lowercase hex digits) and the signer's fingerprint (16 hex digits);
- ``compactml.header_sha256``: SHA-256 over every other entry (``header_digest``), as stored,
  so a change anywhere in the metadata, the signature included, is caught with or without a key.

Reading checks everything before anything is built: the digest, the format of each entry, that
a compressed manifest inflates to at most ``MAX_MANIFEST_BYTES`` (a doctored header cannot make
it allocate more), the type of every manifest field, the keys each kind of source needs, and
the shape of every transform. A header from a newer compactml (an unknown ``compactml.*`` entry,
manifest field, source kind or transform, or a newer format version) asks for an upgrade instead.

Format versions: 1 stored every tensor under its own name and the manifest as plain JSON; 2
(written now) adds packed small tensors (``compactml.export.packing``) and the compressed
manifest. Both are read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

from compactml.errors import ArtifactError, CompactMLError, first_line
from compactml.export.manifest_dict import MANIFEST_ZDICT
from compactml.export.transforms import TRANSFORM_FIELDS, check_transform

FORMAT = "compactml.artifact"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
MANIFEST_KEY = "compactml.manifest"
COMPRESSED_MANIFEST_KEY = "compactml.manifest_zlib"
MANIFEST_KEYS = (MANIFEST_KEY, COMPRESSED_MANIFEST_KEY)
# A compressed manifest may inflate to this many bytes at most: a zip bomb in a doctored header
# is refused after 16 MiB, and a manifest larger than that is written uncompressed.
MAX_MANIFEST_BYTES = 16 * 2**20
HEADER_DIGEST_KEY = "compactml.header_sha256"
SIGNATURE_KEY = "compactml.signature"
KEY_ID_KEY = "compactml.key_id"
_ENTRY_FORMATS = {
    HEADER_DIGEST_KEY: "[0-9a-f]{64}",
    SIGNATURE_KEY: "[0-9a-f]{128}",
    KEY_ID_KEY: "[0-9a-f]{16}",
}
_MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "tool_version": str,
    "source": (dict, type(None)),
    "transforms": list,
    "history": list,
    "aliases": dict,
    "encodings": dict,
    "metrics": (dict, type(None)),
    "tensor_sha256": str,
}
# The keys each kind of source needs (see compactml.source), with their JSON types.
SOURCE_FIELDS: dict[str, dict[str, type]] = {
    "builtin": {"name": str},
    "factory": {"spec": str, "path": str, "sha256": str},
    "hf": {"path": str, "class": str, "config": dict},
}
_MAX_HEADER = 100 * 2**20  # safetensors refuses larger headers too


def not_artifact(name: str) -> ArtifactError:
    """The error for a file that is no artifact at all, or a cut-off one."""
    return ArtifactError(
        f"{name} is not a compactml artifact or is truncated; re-create or re-download it"
    )


def damaged(name: str, what: str) -> ArtifactError:
    """The error for an artifact whose content does not check out."""
    return ArtifactError(f"{name} is damaged ({what}); re-create or re-download it")


def newer(name: str, what: str) -> ArtifactError:
    """The error for an artifact that uses something only a newer compactml knows."""
    return ArtifactError(
        f"{name} was written by a newer compactml ({what}); upgrade compactml to load it"
    )


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook refusing duplicate keys, which would hide one of the values."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


def strict_json(text: str | bytes) -> Any:
    """Parse JSON, refusing duplicate keys and NaN/Infinity; raises ValueError."""

    def refuse_constant(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, object_pairs_hook=_unique_object, parse_constant=refuse_constant)


def _json_value(value: Any) -> Any:
    if callable(getattr(value, "tolist", None)):
        return value.tolist()  # numpy and torch scalars or arrays in metrics
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def manifest_text(manifest: dict[str, Any]) -> str:
    """Canonical JSON of the manifest: sorted keys, no spaces, ASCII only.

    Numpy and torch numbers become JSON numbers. Raises TypeError or ValueError for values
    that are not finite JSON.
    """
    return json.dumps(
        manifest,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
        default=_json_value,
    )


def header_digest(metadata: dict[str, str]) -> str:
    """Hex SHA-256 over every metadata entry except the digest itself (canonical JSON)."""
    entries = {k: v for k, v in metadata.items() if k != HEADER_DIGEST_KEY}
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def compress_manifest(text: str) -> str:
    """``text`` compressed with zlib (level 9, preset dictionary ``MANIFEST_ZDICT``) and
    written in base85: deterministic for one zlib library (another zlib may write other,
    equally valid bytes; the signature is over the text, so it does not change)."""
    deflater = zlib.compressobj(9, zdict=MANIFEST_ZDICT)
    data = deflater.compress(text.encode("utf-8")) + deflater.flush()
    return base64.b85encode(data).decode("ascii")


def inflate_manifest(stored: str, name: str) -> str:
    """The manifest text of a ``compactml.manifest_zlib`` entry, inflating at most
    ``MAX_MANIFEST_BYTES`` bytes; raises ArtifactError for anything else."""
    try:
        data = base64.b85decode(stored)
    except (ValueError, binascii.Error) as exc:
        raise damaged(name, f"{COMPRESSED_MANIFEST_KEY} is not base85") from exc
    inflater = zlib.decompressobj(zdict=MANIFEST_ZDICT)
    try:
        text = inflater.decompress(data, MAX_MANIFEST_BYTES)
    except zlib.error as exc:
        raise damaged(name, f"{COMPRESSED_MANIFEST_KEY} is not zlib data") from exc
    if inflater.unconsumed_tail:
        raise damaged(name, f"the manifest inflates to more than {MAX_MANIFEST_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise damaged(name, f"{COMPRESSED_MANIFEST_KEY} is cut off or has trailing bytes")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise damaged(name, "the manifest is not UTF-8 text") from exc


def stored_manifest(metadata: dict[str, str], name: str) -> str:
    """The manifest text of checked header ``metadata``, inflated when it is compressed."""
    if MANIFEST_KEY in metadata:
        return metadata[MANIFEST_KEY]
    return inflate_manifest(metadata[COMPRESSED_MANIFEST_KEY], name)


def header_metadata(
    manifest: str, signature: str | None = None, signer: str | None = None
) -> dict[str, str]:
    """The metadata entries of an artifact: the manifest (compressed when that is shorter),
    optional signature of the manifest text, and the digest."""
    compressed = compress_manifest(manifest) if len(manifest) < MAX_MANIFEST_BYTES else None
    if compressed is not None and len(compressed) < len(manifest):
        metadata = {COMPRESSED_MANIFEST_KEY: compressed}
    else:
        metadata = {MANIFEST_KEY: manifest}
    if signature is not None and signer is not None:
        metadata[SIGNATURE_KEY] = signature
        metadata[KEY_ID_KEY] = signer
    metadata[HEADER_DIGEST_KEY] = header_digest(metadata)
    return metadata


def _raw_metadata(data: bytes, name: str) -> dict[str, Any]:
    """The ``__metadata__`` object of a safetensors header that holds a compactml manifest."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if size < 2 or 8 + size > len(data):
        raise not_artifact(name)
    try:
        header = strict_json(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise not_artifact(name) from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not any(key in metadata for key in MANIFEST_KEYS):
        raise not_artifact(name)
    return metadata


def read_header(data: bytes, name: str) -> dict[str, str]:
    """The checked metadata entries of artifact bytes ``data`` (``name`` names it in errors)."""
    metadata = _raw_metadata(data, name)
    if not all(isinstance(value, str) for value in metadata.values()):
        raise damaged(name, "a header entry is not a string")
    digest = metadata.get(HEADER_DIGEST_KEY)
    if digest is None:
        raise damaged(name, f"the header has no {HEADER_DIGEST_KEY}")
    if digest != header_digest(metadata):
        raise damaged(name, "the header does not match its SHA-256")
    if all(key in metadata for key in MANIFEST_KEYS):
        raise damaged(name, f"the header has both {MANIFEST_KEY} and {COMPRESSED_MANIFEST_KEY}")
    for key in metadata:
        if key not in MANIFEST_KEYS and key not in _ENTRY_FORMATS:
            if key.startswith("compactml."):
                raise newer(name, f"header entry {key[:40]!r}")
            raise damaged(name, f"unexpected header entry {key[:40]!r}")
    for key, pattern in _ENTRY_FORMATS.items():
        if key in metadata and re.fullmatch(pattern, metadata[key]) is None:
            raise damaged(name, f"header entry {key} is not {pattern}")
    if (SIGNATURE_KEY in metadata) != (KEY_ID_KEY in metadata):
        raise damaged(name, "a signature needs both compactml.signature and compactml.key_id")
    return metadata


def _check_source(source: dict[str, Any] | None, name: str) -> None:
    if source is None:
        return
    kind = source.get("kind")
    if not isinstance(kind, str):
        raise damaged(name, "the manifest's source has no kind")
    if kind not in SOURCE_FIELDS:
        raise newer(name, f"source kind {kind[:40]!r}")
    for key, kind_type in SOURCE_FIELDS[kind].items():
        if not isinstance(source.get(key), kind_type):
            raise damaged(name, f"the {kind} source's {key!r} is missing or invalid")


def _check_transforms(transforms: list[Any], name: str) -> None:
    for index, op in enumerate(transforms):
        kind = op.get("op") if isinstance(op, dict) else None
        if isinstance(kind, str) and kind not in TRANSFORM_FIELDS:
            raise newer(name, f"transform {kind[:40]!r}")
        try:
            check_transform(op)
        except (ValueError, TypeError) as exc:
            raise damaged(name, f"transform {index} is invalid: {first_line(exc)}") from exc


def _check_fields(manifest: dict[str, Any], name: str) -> None:
    version = manifest.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:
        raise newer(name, f"format version {version}; this one reads {FORMAT_VERSION}")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise damaged(name, f"format version {str(version)[:20]} is not one compactml writes")
    unknown = sorted(set(manifest) - set(_MANIFEST_FIELDS))
    if unknown:
        raise newer(name, f"manifest field {unknown[0][:40]!r}")
    for field, kind in _MANIFEST_FIELDS.items():
        if field not in manifest or not isinstance(manifest[field], kind):
            raise damaged(name, f"manifest field {field!r} is missing or invalid")
    aliases = manifest["aliases"].items()
    if not all(isinstance(target, str) for _, target in aliases):
        raise damaged(name, "an alias does not name a tensor")
    if re.fullmatch("[0-9a-f]{64}", manifest["tensor_sha256"]) is None:
        raise damaged(name, "manifest field 'tensor_sha256' is not a SHA-256")


def parse_manifest(text: str, name: str) -> dict[str, Any]:
    """The manifest as a dict, with every field, the source and each transform checked."""
    try:
        manifest = strict_json(text)
    except ValueError as exc:
        raise damaged(name, "the manifest is not JSON") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise not_artifact(name)
    _check_fields(manifest, name)
    _check_source(manifest["source"], name)
    _check_transforms(manifest["transforms"], name)
    return manifest


def is_artifact(path: str | os.PathLike) -> bool:
    """True when ``path`` is a file whose header holds a compactml manifest (damaged or not)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= _MAX_HEADER:
                return False
            data = size.to_bytes(8, "little") + handle.read(size)
        _raw_metadata(data, str(path))
    except (OSError, CompactMLError):
        return False
    return True
