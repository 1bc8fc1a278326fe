"""A damaged or altered .cml file is refused, never loaded as a different model."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors  # safetensors: no pickle involved

from compactml.errors import ArtifactError, SignatureError
from compactml.export.artifact import artifact_bytes, load
from compactml.export.manifest import HEADER_DIGEST_KEY, header_digest
from compactml.export.signing import generate_keypair


def flip(data: bytes, position: int, bit: int) -> bytes:
    """``data`` with one bit flipped."""
    changed = bytearray(data)
    changed[position] ^= 1 << bit
    return bytes(changed)


def refused(path, data: bytes, **kwargs) -> bool:
    """True when loading ``data`` raises ArtifactError (SignatureError is one)."""
    path.write_bytes(data)
    try:
        load(path, **kwargs, trust_factory=True)
    except ArtifactError:
        return True
    return False


def named_positions(data: bytes) -> dict[str, int]:
    """Positions of interesting bytes: length prefix, JSON structure, manifest, data."""
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = data[:header_end]
    manifest_at = header.index(b'"compactml.manifest_zlib":"') + 27
    manifest_end = header.index(b'"', manifest_at)
    return {
        "length prefix low byte": 0,
        "length prefix byte 2": 2,
        "opening brace": 8,
        "metadata key": header.index(b"__metadata__") + 3,
        "manifest key": manifest_at - 10,
        "start of the compressed manifest": manifest_at,
        "middle of the compressed manifest": (manifest_at + manifest_end) // 2,
        "end of the compressed manifest": manifest_end - 1,
        "header digest": header.index(b"compactml.header_sha256") + 28,
        "tensor dtype": header.index(b'"U8"') + 2,
        "tensor shape": header.index(b'"shape":[') + 9,
        "data offsets": header.index(b'"data_offsets":[') + 17,
        "header padding": header_end - 1,
        "first data byte": header_end,
        "middle of data": (header_end + len(data)) // 2,
        "last data byte": len(data) - 1,
    }


@pytest.mark.parametrize("bit", [0, 3, 5, 7])
def test_single_bit_flips_at_named_positions_are_refused(net, tmp_path, bit):
    data = artifact_bytes(net)
    assert not refused(tmp_path / "x.cml", data)
    for where, position in named_positions(data).items():
        assert refused(tmp_path / "x.cml", flip(data, position, bit)), where


def test_every_bit_flip_in_a_signed_file_is_refused(net, tmp_path):
    """Sweep every byte (one bit each) with the verify key: nothing may load."""
    private, public = generate_keypair()
    data = artifact_bytes(net, sign_key=private)
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert b"compactml.signature" in data[:header_end]
    assert not refused(tmp_path / "x.cml", data, verify_key=public)
    loaded_anyway = [
        position
        for position in range(len(data))
        if not refused(tmp_path / "x.cml", flip(data, position, position % 8), verify_key=public)
    ]
    assert loaded_anyway == []


def header_flips_loaded_anyway(tmp_path, data: bytes) -> list[int]:
    """Header positions where flipping one bit still gives a file that loads without a key."""
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert not refused(tmp_path / "x.cml", data)
    return [
        position
        for position in range(header_end)
        if not refused(tmp_path / "x.cml", flip(data, position, (position + 3) % 8))
    ]


def test_every_bit_flip_in_the_header_of_an_unsigned_file_is_refused(net, tmp_path):
    assert header_flips_loaded_anyway(tmp_path, artifact_bytes(net)) == []


def test_every_bit_flip_in_the_header_of_a_signed_file_is_refused_without_a_key(net, tmp_path):
    """The signature and key id are covered by the header digest even when nobody checks them."""
    private, _ = generate_keypair()
    data = artifact_bytes(net, sign_key=private)
    header = data[: 8 + int.from_bytes(data[:8], "little")]
    signature_at = header.index(b'"compactml.signature":"') + 23
    key_id_at = header.index(b'"compactml.key_id":"') + 20
    for position in (signature_at, signature_at + 127, key_id_at, key_id_at + 15):
        for bit in range(8):
            assert refused(tmp_path / "x.cml", flip(data, position, bit)), (position, bit)
    assert header_flips_loaded_anyway(tmp_path, data) == []


def test_consistent_forgery_is_caught_by_the_signature(net, tmp_path, perturb):
    """Changed weights with recomputed digests load without a key, but not with one."""
    private, public = generate_keypair()
    signed = artifact_bytes(net, sign_key=private)
    forged_model = perturb(net, seed=9)
    forged = artifact_bytes(forged_model)
    signed_meta = json.loads(signed[8 : 8 + int.from_bytes(signed[:8], "little")])["__metadata__"]
    tensors = load_safetensors(forged)
    metadata = json.loads(forged[8 : 8 + int.from_bytes(forged[:8], "little")])["__metadata__"]
    metadata["compactml.signature"] = signed_meta["compactml.signature"]
    metadata["compactml.key_id"] = signed_meta["compactml.key_id"]
    metadata[HEADER_DIGEST_KEY] = header_digest(metadata)
    path = tmp_path / "forged.cml"
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    # The digests match: only a key can tell.
    assert isinstance(load(path, trust_factory=True), torch.nn.Module)
    with pytest.raises(SignatureError, match="changed after signing"):
        load(path, verify_key=public, trust_factory=True)
