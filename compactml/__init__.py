"""compactml: make trained PyTorch models smaller, faster and cheaper to run, and prove it."""

from compactml.errors import ArtifactError, CompactMLError, SignatureError
from compactml.task import Task

__version__ = "0.1.0"

__all__ = ["ArtifactError", "CompactMLError", "SignatureError", "Task", "__version__"]
