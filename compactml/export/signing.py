"""Ed25519 keys and signatures for ``.cml`` artifacts.

An artifact is signed by signing its manifest, which holds the SHA-256 of every tensor, so one
64-byte signature covers the weights too. Keys are PEM files: the private key at ``path`` (mode
0600), the public key at ``path + ".pub"``. Ed25519 is RFC 8032; the ``cryptography`` package
does the math.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compactml.errors import CompactMLError, SignatureError
from compactml.io import atomic_write_bytes

KeyLike = Ed25519PrivateKey | Ed25519PublicKey | bytes | str | os.PathLike


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """A fresh random ed25519 key pair ``(private, public)``."""
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def write_keypair(path: str | os.PathLike) -> tuple[Path, Path]:
    """Generate a key pair; write the private key to ``path`` and the public key beside it.

    Both are PEM (PKCS#8 private, SubjectPublicKeyInfo public); the private file gets mode 0600.
    Returns ``(private_path, public_path)``. Refuses to replace an existing key file.
    """
    private_path = Path(path)
    public_path = Path(f"{private_path}.pub")
    for existing in (private_path, public_path):
        if existing.exists():
            raise CompactMLError(
                f"key file {existing} already exists; choose another path or delete it first"
            )
    private, public = generate_keypair()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # The temporary file gets mode 0600 before the key is written into it, so the private key
    # is never readable by others, not even for a moment.
    atomic_write_bytes(private_path, private_pem, permissions=0o600)
    atomic_write_bytes(public_path, public_pem, permissions=0o644)
    return private_path, public_path


def _read_key_input(key: bytes | str | os.PathLike) -> tuple[bytes, str]:
    """The PEM bytes of ``key`` and a name for messages (the file name, or "the given key")."""
    if isinstance(key, bytes):
        return key, "the given key"
    if isinstance(key, str) and key.lstrip().startswith("-----BEGIN"):
        return key.encode("ascii", "replace"), "the given key"
    if not isinstance(key, str | os.PathLike):
        raise CompactMLError(
            f"a key must be an ed25519 key, PEM bytes or a path to a PEM file, not "
            f"{type(key).__name__}; pass one of those"
        )
    path = Path(key)
    if not path.exists():
        raise CompactMLError(f"key file {path} does not exist; check the path")
    if not path.is_file():
        raise CompactMLError(f"key file {path} is not a file; give the path of a PEM key file")
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise CompactMLError(
            f"cannot read key file {path} ({exc.strerror}); check its permissions"
        ) from exc


def _parse_private(pem: bytes, name: str) -> Ed25519PrivateKey | None:
    """The private key in ``pem``, or None when ``pem`` holds no private key."""
    if b"PRIVATE KEY" not in pem:
        return None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as exc:  # raised by cryptography for a password-protected key
        raise CompactMLError(
            f"{name} is encrypted with a password; write an unencrypted key with write_keypair"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CompactMLError(f"{name} is not a valid PEM key; give an ed25519 key file") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CompactMLError(f"{name} is not an ed25519 key; create one with write_keypair")
    return key


def _parse_public(pem: bytes, name: str) -> Ed25519PublicKey | None:
    """The public key in ``pem``, or None when ``pem`` holds no public key."""
    if b"PUBLIC KEY" not in pem:
        return None
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CompactMLError(f"{name} is not a valid PEM key; give an ed25519 key file") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise CompactMLError(f"{name} is not an ed25519 key; create one with write_keypair")
    return key


def load_private_key(key: KeyLike) -> Ed25519PrivateKey:
    """An ed25519 private key from a key object, PEM bytes/text, or a path to a PEM file."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, Ed25519PublicKey):
        raise CompactMLError(
            "signing needs the private key, but a public key was given; pass the private key"
        )
    pem, name = _read_key_input(key)
    private = _parse_private(pem, name)
    if private is not None:
        return private
    if b"PUBLIC KEY" in pem:
        raise CompactMLError(
            f"{name} is a public key; signing needs the private key (the file without .pub)"
        )
    raise CompactMLError(f"{name} is not a PEM key; give an ed25519 private key file")


def load_public_key(key: KeyLike) -> Ed25519PublicKey:
    """An ed25519 public key from a key object, PEM bytes/text, or a path to a PEM file.

    A private key is accepted too: its public half is derived from it.
    """
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    pem, name = _read_key_input(key)
    public = _parse_public(pem, name)
    if public is not None:
        return public
    private = _parse_private(pem, name)
    if private is not None:
        return private.public_key()
    raise CompactMLError(f"{name} is not a PEM key; give an ed25519 public key file (.pub)")


def key_id(public_key: KeyLike) -> str:
    """Short fingerprint of a key: the first 16 hex digits of SHA-256 of the raw public key."""
    raw = load_public_key(public_key).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_bytes(data: bytes, key: KeyLike) -> bytes:
    """The 64-byte ed25519 signature of ``data`` with the private ``key``."""
    return load_private_key(key).sign(data)


def verify_bytes(data: bytes, signature: bytes, key: KeyLike) -> bool:
    """True when ``signature`` is a valid ed25519 signature of ``data`` by ``key``."""
    try:
        load_public_key(key).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def check_signature(
    data: bytes, signature: str | None, signer: str | None, key: KeyLike, name: str
) -> None:
    """Raise SignatureError unless hex ``signature`` signs ``data`` with the public ``key``.

    ``signer`` is the key id recorded beside the signature; ``name`` names the file in messages.
    """
    public = load_public_key(key)
    expected = key_id(public)
    if signature is None:
        raise SignatureError(
            f"{name} is not signed; sign it with sign_artifact or load it without a verify key"
        )
    valid = (
        re.fullmatch("[0-9a-f]{128}", signature) is not None
        and signer == expected
        and verify_bytes(data, bytes.fromhex(signature), public)
    )
    if not valid:
        raise SignatureError(
            f"{name} is not signed by key {expected} (it names key {str(signer)[:16]!r}) or was "
            "changed after signing; check the public key or re-download the file"
        )
