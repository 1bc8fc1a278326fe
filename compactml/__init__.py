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
from compactml.prune import (
    NM,
    Channels,
    Graph,
    Heads,
    Iterative,
    Magnitude,
    OneShot,
    SparseGPT,
    Taylor,
    Wanda,
    prune,
    sparsity,
)
from compactml.quantize import (
    AWQ,
    GPTQ,
    QAT,
    Dynamic,
    Half,
    MixedPrecision,
    SmoothQuant,
    Static,
    WeightOnly,
    quantize,
)
from compactml.sensitivity import SensitivityTable, sensitivity
from compactml.task import Task
from compactml.techniques import TECHNIQUES
from compactml.training import fine_tune

__version__ = "0.1.0"

__all__ = [
    "TECHNIQUES",
    "AWQ",
    "ArtifactError",
    "Channels",
    "CompactMLError",
    "Dynamic",
    "GPTQ",
    "Graph",
    "Half",
    "Heads",
    "Iterative",
    "Magnitude",
    "Metrics",
    "MixedPrecision",
    "NM",
    "OneShot",
    "Profile",
    "QAT",
    "SensitivityTable",
    "SignatureError",
    "SmoothQuant",
    "SparseGPT",
    "Static",
    "Task",
    "Taylor",
    "__version__",
    "evaluate",
    "examples",
    "export",
    "fine_tune",
    "generate_keypair",
    "load",
    "load_targets",
    "profile",
    "prune",
    "quantize",
    "read_manifest",
    "save",
    "sensitivity",
    "sign_artifact",
    "sparsity",
    "verify_artifact",
    "Wanda",
    "WeightOnly",
    "write_keypair",
]
