"""Saving and exporting models: the signed ``.cml`` artifact and its keys."""

from compactml.export.artifact import (
    artifact_bytes,
    load,
    read_manifest,
    save,
    sign_artifact,
    verify_artifact,
)
from compactml.export.onnx import export
from compactml.export.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    write_keypair,
)

__all__ = [
    "artifact_bytes",
    "export",
    "generate_keypair",
    "key_id",
    "load",
    "load_private_key",
    "load_public_key",
    "read_manifest",
    "save",
    "sign_artifact",
    "verify_artifact",
    "write_keypair",
]
