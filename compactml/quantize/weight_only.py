"""Data-free weight compression: ``WeightOnly`` (2-8 bit integers) and ``Half`` (fp16/bf16).

Both swap every selected ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` for its quantized
module (:mod:`compactml.quantize.modules`); activations stay float32. Layers the scheme cannot
handle (a group size that does not divide the row length, an Embedding with ``max_norm``) stay
in float, are named in a warning, and are recorded on the returned model
(``compactml.config.history``).
"""

from __future__ import annotations

import dataclasses
import warnings

from torch import nn

from compactml.config import Technique, record, replace_module
from compactml.errors import CompactMLError
from compactml.quantize.affine import (
    GROUP_SIZES,
    FloatScheme,
    PerChannel,
    PerGroup,
    QScheme,
    Scheme,
)
from compactml.quantize.clip import CLIP_METHODS
from compactml.quantize.modules import QUANT_MODULES
from compactml.source import get_source, set_source
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
    changed: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in chosen:
        try:
            layer = QUANT_MODULES[type(module)].from_float(module, scheme, clip)
        except CompactMLError as exc:
            skipped[name] = str(exc)
            continue
        if name:
            replace_module(new, name, layer)
        else:  # the model is a single layer
            new = set_source(layer, get_source(new)) if get_source(new) else layer
        changed.append(name)
    if not changed:
        name, reason = next(iter(skipped.items()))
        raise CompactMLError(f"no selected layer can be quantized; {name or 'model'}: {reason}")
    if skipped:
        listed = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        warnings.warn(
            f"{type(technique).__name__} kept {len(skipped)} layer(s) in float: {listed}",
            stacklevel=3,
        )
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
        clip: ``"none"`` (min/max) or ``"mse"`` (per-group clipping search that minimizes the
            weight's squared error, no data needed; see ``compactml.quantize.clip``).
        include, exclude: fnmatch patterns on module names.

    Scales are stored in float16; 4-bit group-32 symmetric weights take 4.5 bits each.
    """

    family = "quantize"
    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = True
    clip: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES
        ):
            raise CompactMLError(
                f"group_size={self.group_size!r} is not supported; use one of "
                f"{', '.join(map(str, GROUP_SIZES))}, or None for per-channel scales"
            )
        if not isinstance(self.symmetric, bool):
            raise CompactMLError(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.clip not in CLIP_METHODS:
            raise CompactMLError(
                f"clip={self.clip!r} is not supported; use one of {', '.join(CLIP_METHODS)}"
            )
        self.scheme()  # validates bits

    def scheme(self) -> QScheme:
        """The :class:`QScheme` this config quantizes with."""
        gran = PerChannel(0) if self.group_size is None else PerGroup(self.group_size)
        return QScheme(self.bits, self.symmetric, gran)

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
