"""The compressed manifest: shorter, signed over its text, and bounded when read."""

from __future__ import annotations

import base64
import hashlib
import json
import tracemalloc
import zlib
from collections.abc import Callable

import pytest
import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors  # safetensors: no pickle involved

from compactml.errors import ArtifactError, SignatureError
from compactml.export.artifact import artifact_bytes, load, read_manifest, sign_artifact
from compactml.export.manifest import (
    COMPRESSED_MANIFEST_KEY,
    HEADER_DIGEST_KEY,
    MANIFEST_KEY,
    MAX_MANIFEST_BYTES,
    SIGNATURE_KEY,
    compress_manifest,
    header_digest,
    header_metadata,
    stored_manifest,
)
from compactml.export.manifest_dict import MANIFEST_ZDICT
from compactml.export.signing import generate_keypair


def metadata_of(data: bytes) -> dict[str, str]:
    """The header metadata of artifact bytes ``data``."""
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]


def with_metadata(data: bytes, edit: Callable[[dict[str, str]], None]) -> bytes:
    """``data`` with its header metadata edited and the header digest recomputed."""
    metadata = metadata_of(data)
    edit(metadata)
    metadata[HEADER_DIGEST_KEY] = header_digest(metadata)
    return safetensors.torch.save(load_safetensors(data), metadata=metadata)


def deflate(text: bytes, level: int = 9, zdict: bytes | None = MANIFEST_ZDICT) -> bytes:
    """``text`` compressed with zlib (and the manifest dictionary unless None)."""
    deflater = zlib.compressobj(level, zdict=zdict) if zdict else zlib.compressobj(level)
    return deflater.compress(text) + deflater.flush()


def b85(data: bytes) -> str:
    return base64.b85encode(data).decode("ascii")


def test_the_dictionary_is_frozen():
    """Every format version 2 file needs these exact bytes: a new one needs a new version."""
    digest = hashlib.sha256(MANIFEST_ZDICT).hexdigest()
    assert digest == "1e1d0e4907cca3c057a6d65c21c612fd847134538809e50604e650db22433ce3"


def test_the_manifest_is_compressed_only_when_that_is_shorter():
    assert header_metadata('{"a":1}').keys() == {MANIFEST_KEY, HEADER_DIGEST_KEY}
    text = json.dumps({"transforms": [{"module": f"layer{i}", "op": "delete"} for i in range(50)]})
    metadata = header_metadata(text)
    assert metadata.keys() == {COMPRESSED_MANIFEST_KEY, HEADER_DIGEST_KEY}
    assert len(metadata[COMPRESSED_MANIFEST_KEY]) < len(text) / 5
    assert stored_manifest(metadata, "x") == text


def test_a_saved_manifest_is_compressed_and_read_back(net, tmp_path):
    data = artifact_bytes(net, metrics={"accuracy": 0.5})
    metadata = metadata_of(data)
    assert MANIFEST_KEY not in metadata
    text = stored_manifest(metadata, "x")
    assert len(metadata[COMPRESSED_MANIFEST_KEY]) < len(text) / 2
    path = tmp_path / "net.cml"
    path.write_bytes(data)
    assert read_manifest(path) == json.loads(text)


def _bomb(megabytes: int) -> str:
    """A compressed manifest of ``megabytes`` MiB of spaces (about 1 KiB per MiB stored)."""
    deflater, chunk = zlib.compressobj(9), b" " * 2**20
    data = b"".join(deflater.compress(chunk) for _ in range(megabytes)) + deflater.flush()
    return base64.b85encode(data).decode("ascii")


def with_compressed(data: bytes, value: str) -> bytes:
    """``data`` with ``value`` as its compressed manifest (the header digest recomputed)."""
    return with_metadata(data, lambda metadata: metadata.update({COMPRESSED_MANIFEST_KEY: value}))


def test_a_zip_bomb_is_refused_without_inflating_it(net, tmp_path):
    assert MAX_MANIFEST_BYTES == 16 * 2**20
    bomb = _bomb(128)
    assert len(bomb) < 200_000  # 128 MiB inflated
    path = tmp_path / "bomb.cml"
    path.write_bytes(with_compressed(artifact_bytes(net), bomb))
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match="damaged.*inflates to more than 16777216 bytes"):
            load(path, trust_factory=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_MANIFEST_BYTES, peak  # zlib grows its output buffer up to 2x


BAD_VALUES = {
    "not base85": ("abc.,", "is not base85"),
    "not zlib": (b85(b"\x00" * 40), "is not zlib data"),
    "cut off": (b85(deflate(b'{"a":' + b"1" * 500 + b"}")[:-6]), "cut off"),
    "trailing bytes": (b85(deflate(b'{"a":1}') + b"xyzw"), "trailing bytes"),
    "not UTF-8": (b85(deflate(b"\xff\xfe{}")), "not UTF-8"),
    "not JSON": (b85(deflate(b"{manifest")), "not JSON"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=list(BAD_VALUES))
def test_a_bad_compressed_manifest_is_a_damaged_file(net, tmp_path, case):
    value, message = BAD_VALUES[case]
    path = tmp_path / "bad.cml"
    path.write_bytes(
        with_metadata(artifact_bytes(net), lambda m: m.update({COMPRESSED_MANIFEST_KEY: value}))
    )
    with pytest.raises(ArtifactError, match=f"damaged.*{message}"):
        load(path, trust_factory=True)


def test_a_header_with_both_manifests_is_damaged(net, tmp_path):
    def add_plain(metadata: dict[str, str]) -> None:
        metadata[MANIFEST_KEY] = stored_manifest(metadata, "x")

    path = tmp_path / "both.cml"
    path.write_bytes(with_metadata(artifact_bytes(net), add_plain))
    with pytest.raises(ArtifactError, match="both compactml.manifest and"):
        load(path, trust_factory=True)


def test_a_plain_manifest_is_still_read(net, image, tmp_path):
    def plain(metadata: dict[str, str]) -> None:
        metadata[MANIFEST_KEY] = stored_manifest(metadata, "x")
        del metadata[COMPRESSED_MANIFEST_KEY]

    path = tmp_path / "plain.cml"
    path.write_bytes(with_metadata(artifact_bytes(net), plain))
    assert torch.equal(load(path, trust_factory=True)(image), net(image))


def test_the_signature_covers_the_manifest_text_not_its_compression(net, image, tmp_path):
    private, public = generate_keypair()
    data = artifact_bytes(net, sign_key=private)
    metadata = metadata_of(data)
    text = stored_manifest(metadata, "x")
    public.verify(bytes.fromhex(metadata[SIGNATURE_KEY]), text.encode("utf-8"))  # raises if not
    # The same text compressed otherwise (another zlib, another level) still verifies.
    recompressed = b85(deflate(text.encode(), level=1, zdict=None))
    assert recompressed != metadata[COMPRESSED_MANIFEST_KEY]
    path = tmp_path / "other.cml"
    path.write_bytes(
        with_metadata(data, lambda m: m.update({COMPRESSED_MANIFEST_KEY: recompressed}))
    )
    assert torch.equal(load(path, verify_key=public, trust_factory=True)(image), net(image))
    # Another text, however it is stored, does not.
    manifest = json.loads(text) | {"metrics": {"accuracy": 1.0}}
    forged = compress_manifest(json.dumps(manifest, sort_keys=True))
    path.write_bytes(with_compressed(data, forged))
    assert read_manifest(path)["metrics"] == {"accuracy": 1.0}  # the digest was recomputed
    with pytest.raises(SignatureError, match="changed after signing"):
        load(path, verify_key=public, trust_factory=True)


def test_signing_a_saved_artifact_signs_its_manifest_text(net, image, tmp_path):
    private, public = generate_keypair()
    unsigned = tmp_path / "net.cml"
    unsigned.write_bytes(artifact_bytes(net))
    signed = sign_artifact(unsigned, tmp_path / "signed.cml", private)
    assert signed.read_bytes() == artifact_bytes(net, sign_key=private)
    assert torch.equal(load(signed, verify_key=public, trust_factory=True)(image), net(image))
