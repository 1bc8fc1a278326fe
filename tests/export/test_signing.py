"""Ed25519 keys, and signed .cml artifacts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from safetensors import safe_open

from compactml.errors import CompactMLError, SignatureError
from compactml.export.artifact import (
    artifact_bytes,
    load,
    read_manifest,
    save,
    sign_artifact,
    verify_artifact,
)
from compactml.export.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign_bytes,
    verify_bytes,
    write_keypair,
)


def test_sign_and_verify_bytes():
    private, public = generate_keypair()
    _, other = generate_keypair()
    signature = sign_bytes(b"manifest", private)
    assert len(signature) == 64
    assert verify_bytes(b"manifest", signature, public)
    assert verify_bytes(b"manifest", signature, private)  # the public half is derived
    assert not verify_bytes(b"manifesT", signature, public)
    assert not verify_bytes(b"manifest", signature, other)


def test_write_keypair_files(tmp_path):
    private_path, public_path = write_keypair(tmp_path / "keys" / "signer")
    assert private_path == tmp_path / "keys" / "signer"
    assert public_path == tmp_path / "keys" / "signer.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private_path.read_bytes()
    assert b"PUBLIC KEY" in public_path.read_bytes()
    kid = key_id(public_path)
    assert len(kid) == 16 and int(kid, 16) >= 0
    assert key_id(private_path) == kid == key_id(load_private_key(str(private_path)))
    signature = sign_bytes(b"data", private_path)
    assert verify_bytes(b"data", signature, public_path.read_bytes())
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["signer", "signer.pub"]


def test_write_keypair_refuses_to_overwrite(tmp_path):
    private_path, public_path = write_keypair(tmp_path / "k")
    before = private_path.read_bytes()
    with pytest.raises(CompactMLError, match="already exists"):
        write_keypair(tmp_path / "k")
    assert private_path.read_bytes() == before
    private_path.unlink()
    with pytest.raises(CompactMLError, match="k.pub already exists"):
        write_keypair(tmp_path / "k")
    assert not private_path.exists()


def test_bad_keys_give_clear_errors(tmp_path):
    private_path, public_path = write_keypair(tmp_path / "k")
    with pytest.raises(CompactMLError, match="does not exist"):
        load_public_key(tmp_path / "missing.pub")
    with pytest.raises(CompactMLError, match="public key; signing needs the private key"):
        load_private_key(public_path)
    with pytest.raises(CompactMLError, match="needs the private key"):
        load_private_key(load_public_key(public_path))
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(CompactMLError, match="not a PEM key"):
        load_public_key(tmp_path / "junk")
    with pytest.raises(CompactMLError, match="is not a file"):
        load_private_key(tmp_path)
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(CompactMLError, match="not an ed25519 key"):
        load_private_key(rsa_pem)
    private, _ = generate_keypair()
    encrypted = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(CompactMLError, match="encrypted"):
        load_private_key(encrypted)


def test_signed_round_trip(net, image, tmp_path):
    private_path, public_path = write_keypair(tmp_path / "key")
    path = save(net, tmp_path / "net.cml", sign_key=private_path)
    loaded = load(path, verify_key=public_path, trust_factory=True)
    assert torch.equal(loaded(image), net(image))
    assert load(path, trust_factory=True) is not None  # a signed file also loads without a key
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["compactml.key_id"] == key_id(public_path)


def test_wrong_key_and_unsigned_file_are_refused(net, tmp_path):
    private, public = generate_keypair()
    _, stranger = generate_keypair()
    signed = save(net, tmp_path / "signed.cml", sign_key=private)
    with pytest.raises(SignatureError, match=key_id(stranger)):
        load(signed, verify_key=stranger)
    unsigned = save(net, tmp_path / "unsigned.cml")
    with pytest.raises(SignatureError, match="is not signed"):
        load(unsigned, verify_key=public)
    with pytest.raises(SignatureError, match="is not signed"):
        read_manifest(unsigned, verify_key=public)


def test_sign_artifact_then_verify(net, tmp_path):
    private, public = generate_keypair()
    src = save(net, tmp_path / "net.cml", metrics={"accuracy": 0.5})
    before = src.read_bytes()
    dst = sign_artifact(src, tmp_path / "signed.cml", private)
    assert src.read_bytes() == before
    manifest = verify_artifact(dst, public)
    assert manifest == read_manifest(src)
    assert dst.read_bytes() == artifact_bytes(net, metrics={"accuracy": 0.5}, sign_key=private)
    with safe_open(str(src), "pt") as a, safe_open(str(dst), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    _, stranger = generate_keypair()
    with pytest.raises(SignatureError):
        verify_artifact(dst, stranger)
    with pytest.raises(SignatureError, match="is not signed"):
        verify_artifact(src, public)


def test_sign_artifact_refuses_its_input_as_output(net, tmp_path):
    private, _ = generate_keypair()
    src = save(net, tmp_path / "net.cml")
    before = src.read_bytes()
    with pytest.raises(CompactMLError, match="input file"):
        sign_artifact(src, src, private)
    with pytest.raises(CompactMLError, match="private key"):
        sign_artifact(src, tmp_path / "signed.cml", private.public_key())
    assert src.read_bytes() == before
    assert not (tmp_path / "signed.cml").exists()


def test_write_keypair_never_exposes_the_private_key(tmp_path, monkeypatch):
    """The private key's file is already 0600 when it is renamed into place."""
    modes = {}
    real_replace = os.replace

    def spy(src, dst):
        modes[Path(dst).name] = stat.S_IMODE(os.stat(src).st_mode)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    private_path, public_path = write_keypair(tmp_path / "k")
    assert modes == {"k": 0o600, "k.pub": 0o644}
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644


@pytest.mark.parametrize("as_text", [False, True], ids=["path", "str"])
def test_sign_artifact_refuses_to_overwrite_its_key(net, tmp_path, as_text):
    private_path, public_path = write_keypair(tmp_path / "k1")
    key = str(private_path) if as_text else private_path
    src = save(net, tmp_path / "net.cml")
    before = private_path.read_bytes()
    with pytest.raises(CompactMLError, match="choose a different output path"):
        sign_artifact(src, key, key)
    assert private_path.read_bytes() == before
    with pytest.raises(CompactMLError, match="is not a compactml artifact; choose a new"):
        sign_artifact(src, public_path, key)
    assert b"PUBLIC KEY" in public_path.read_bytes()


def test_sign_artifact_refuses_any_existing_non_artifact(net, tmp_path):
    private, public = generate_keypair()
    src = save(net, tmp_path / "net.cml")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(CompactMLError, match=r"notes\.txt exists and is not a compactml artifact"):
        sign_artifact(src, notes, private)
    assert notes.read_text() == "keep me"
    other_key, _ = write_keypair(tmp_path / "other")
    with pytest.raises(CompactMLError, match="not a compactml artifact"):
        sign_artifact(src, other_key, private)  # a key file given as output, key as an object
    assert b"PRIVATE KEY" in other_key.read_bytes()
    # An existing artifact may be replaced by its signed copy.
    old = save(net, tmp_path / "old.cml", metrics={"accuracy": 0.1})
    sign_artifact(src, old, private)
    assert verify_artifact(old, public) == read_manifest(src)
