"""A damaged or altered .cml file is refused, never loaded as a different model."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from compactml.errors import ArtifactError, SignatureError
from compactml.export.artifact import artifact_bytes, load
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
        load(path, **kwargs)
    except ArtifactError:
        return True
    return False


def named_positions(data: bytes) -> dict[str, int]:
    """Positions of interesting bytes: length prefix, JSON structure, manifest, data."""
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = data[:header_end]
    return {
        "length prefix low byte": 0,
        "length prefix byte 2": 2,
        "opening brace": 8,
        "metadata key": header.index(b"__metadata__") + 3,
        "manifest text": header.index(b"tensor_sha256") + 20,
        "transforms in manifest": header.index(b"transforms"),
        "manifest digest": header.index(b"compactml.manifest_sha256") + 30,
        "tensor dtype": header.index(b'"F32"') + 2,
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


def test_every_bit_flip_in_the_header_of_an_unsigned_file_is_refused(net, tmp_path):
    data = artifact_bytes(net)
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert not refused(tmp_path / "x.cml", data)
    loaded_anyway = [
        position
        for position in range(header_end)
        if not refused(tmp_path / "x.cml", flip(data, position, (position + 3) % 8))
    ]
    assert loaded_anyway == []


def test_consistent_forgery_is_caught_by_the_signature(net, tmp_path, perturb):
    """Changed weights with recomputed digests load without a key, but not with one."""
    private, public = generate_keypair()
    signed = artifact_bytes(net, sign_key=private)
    forged_model = perturb(net, seed=9)
    forged = artifact_bytes(forged_model)
    signed_meta = json.loads(signed[8 : 8 + int.from_bytes(signed[:8], "little")])["__metadata__"]
    tensors = safetensors.torch.load(forged)
    metadata = json.loads(forged[8 : 8 + int.from_bytes(forged[:8], "little")])["__metadata__"]
    metadata["compactml.signature"] = signed_meta["compactml.signature"]
    metadata["compactml.key_id"] = signed_meta["compactml.key_id"]
    path = tmp_path / "forged.cml"
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    assert isinstance(load(path), torch.nn.Module)  # digests match: only a key can tell
    with pytest.raises(SignatureError, match="changed after signing"):
        load(path, verify_key=public)
