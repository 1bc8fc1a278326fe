"""compactml: make trained PyTorch models smaller, faster and cheaper to run, and prove it.

This module only re-exports the public API; see docs/architecture.md for where things live.
"""

from compactml import examples
from compactml.errors import ArtifactError, CompactMLError, SignatureError
from compactml.evaluate import Metrics, evaluate
from compactml.export.artifact import load, read_manifest, save, sign_artifact, verify_artifact
from compactml.export.onnx import export
from compactml.export.signing import generate_keypair, write_keypair
from compactml.profile import Profile, profile
from compactml.profile.targets import load_targets
from compactml.quantize import (
    QAT,
    Dynamic,
    Half,
    MixedPrecision,
    Static,
    WeightOnly,
    quantize,
)
from compactml.task import Task
from compactml.techniques import TECHNIQUES

__version__ = "0.1.0"

__all__ = [
    "TECHNIQUES",
    "ArtifactError",
    "CompactMLError",
    "Dynamic",
    "Half",
    "Metrics",
    "MixedPrecision",
    "Profile",
    "QAT",
    "SignatureError",
    "Static",
    "Task",
    "__version__",
    "evaluate",
    "examples",
    "export",
    "generate_keypair",
    "load",
    "load_targets",
    "profile",
    "quantize",
    "read_manifest",
    "save",
    "sign_artifact",
    "verify_artifact",
    "WeightOnly",
    "write_keypair",
]
