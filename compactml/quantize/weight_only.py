"""Data-free weight compression: ``WeightOnly`` (2-8 bit integers) and ``Half`` (fp16/bf16).

Both swap every selected ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` for its quantized
module (:mod:`compactml.quantize.modules`); activations stay float32. Layers the scheme cannot
handle (a group size that does not divide the row length, an Embedding with ``max_norm``) stay
in float, are named in a warning, and are recorded on the returned model
(``compactml.config.history``).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from compactml.config import Technique, record
from compactml.errors import CompactMLError
from compactml.quantize.affine import FloatScheme, QScheme, Scheme, weight_granularity
from compactml.quantize.clip import CLIP_METHODS
from compactml.quantize.modules import QUANT_MODULES
from compactml.quantize.swap import build_layers, check_some_built, set_layer, warn_skipped
from compactml.task import Task

LAYER_TYPES = "Linear, Conv2d or Embedding"


def swap_layers(
    technique: Technique, model: nn.Module, scheme: Scheme, clip: str = "none"
) -> nn.Module:
    """A copy of ``model`` whose selected layers are quantized with ``scheme``.

    Layers that raise a CompactMLError while quantizing stay in float and are listed in a
    warning; when every selected layer fails, that is an error (nothing would change).
    """
    new = technique.copy_model(model)
    chosen = technique.targets(new, tuple(QUANT_MODULES))
    if not chosen:
        raise CompactMLError(
            f"{type(technique).__name__} found no {LAYER_TYPES} layer selected by "
            f"include={list(technique.include)} exclude={list(technique.exclude)}; "
            "check the patterns against the model's module names"
        )
    built, skipped = build_layers(
        chosen, lambda module: QUANT_MODULES[type(module)].from_float(module, scheme, clip)
    )
    check_some_built(built, skipped)
    for name, layer in built.items():
        new = set_layer(new, name, layer)
    warn_skipped(technique, skipped)
    changed = list(built)
    record(new, technique, changed, skipped)
    return new


@dataclasses.dataclass(frozen=True)
class WeightOnly(Technique):
    """Round-to-nearest integer weights, activations left in float.

    Args:
        bits: 2 to 8 bits per weight.
        group_size: weights per scale along each row (16, 32, 64, 128 or 256); None gives one
            scale per output channel (per row of an Embedding).
        symmetric: zero point fixed at the middle code (no zero points stored); False stores a
            uint8 zero point per scale and represents 0 exactly.
        clip: ``"none"`` (min/max) or ``"mse"`` (per-group clipping search, then
            least-squares refits of scale and zero point, minimizing the weight's squared
            error with no data; see ``compactml.quantize.clip``).
        include, exclude: fnmatch patterns on module names.

    Scales are stored in float16; 4-bit group-32 symmetric weights take 4.5 bits each.
    """

    family = "quantize"
    level = "bits"
    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = True
    clip: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        weight_granularity(self.group_size)  # validates group_size
        if not isinstance(self.symmetric, bool):
            raise CompactMLError(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.clip not in CLIP_METHODS:
            raise CompactMLError(
                f"clip={self.clip!r} is not supported; use one of {', '.join(CLIP_METHODS)}"
            )
        self.scheme()  # validates bits

    def scheme(self) -> QScheme:
        """The :class:`QScheme` this config quantizes with."""
        return QScheme(self.bits, self.symmetric, weight_granularity(self.group_size))

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A copy of ``model`` with weight-quantized layers (``task`` is not needed)."""
        return swap_layers(self, model, self.scheme(), self.clip)


@dataclasses.dataclass(frozen=True)
class Half(Technique):
    """Weights stored as ``"float16"`` or ``"bfloat16"``; computation and inputs stay float32.

    Covers Linear, Conv2d and Embedding weights (biases and norm layers stay float32).
    """

    family = "quantize"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        super().__post_init__()
        FloatScheme(self.dtype)  # validates the dtype

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A copy of ``model`` with half-precision weights (``task`` is not needed)."""
        return swap_layers(self, model, FloatScheme(self.dtype))
