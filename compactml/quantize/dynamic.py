"""Dynamic INT8: int8 per-channel weights, activations quantized per token at run time.

``Dynamic(bits=8)`` swaps every selected ``nn.Linear`` for a :class:`DynamicQuantLinear`. No
calibration data is needed: each token's (row's) activation scale is computed from that token
when the layer runs (per-token dynamic quantization, as in LLM.int8(), Dettmers et al. 2022,
and ZeroQuant, Yao et al. 2022, without their outlier handling).

The activation scheme is chosen for ONNX Runtime on x86 (see
:mod:`compactml.export.onnx_dynamic`): its fast integer kernels multiply *uint8* activations by
*int8* weights (U8S8, AVX-512 VNNI), so activations are symmetric codes offset by a fixed zero
point of 128 (``amax_t = max|x_t|``, floored at :data:`AMAX_FLOOR` so an all-zero token gets
exact zeros)::

    scale_t = amax_t / 127
    q_t     = clamp(round(x_t * (127 / amax_t)) + 128, 0, 255)    (uint8, round half to even)
    y_t     = ((q_t - 128) @ (W_q - 128).T) * scale_t * scale_w + b

Weights are stored like :class:`~compactml.quantize.modules.QuantLinear`'s: 8-bit symmetric
per-output-channel codes with float16 scales (``qweight``/``scale`` buffers, a
:class:`~compactml.quantize.qweight.QWeight`). The PyTorch forward computes the same numbers
in float32 (quantize per token, dequantize, matmul with the dequantized weight); the integer
form in ONNX Runtime differs only by float32 summation order (see
:mod:`compactml.export.onnx_dynamic`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.config import (
    Technique,
    check_bools,
    check_patterns,
    check_positive_ints,
    matches,
    record,
)
from compactml.errors import CompactMLError
from compactml.quantize.affine import PerChannel, QScheme, scheme_from_dict
from compactml.quantize.modules import QuantWeightMixin, _bias_from, linear_spec
from compactml.quantize.qweight import QWeight
from compactml.quantize.swap import build_layers, check_some_built, set_layer, warn_skipped
from compactml.task import Task

#: The weight scheme: int8, symmetric, one float16 scale per output channel.
WEIGHT_SCHEME = QScheme(bits=8, symmetric=True, granularity=PerChannel(0))
#: Activation codes: uint8 with the fixed zero point 128; scale = max|x_t| / ACT_QMAX.
ACT_ZERO_POINT = 128
ACT_QMAX = 127
#: Smallest max|x_t| used for a scale: an all-zero token gets codes 128 (exact zeros) and a
#: finite scale instead of 0/0.
AMAX_FLOOR = 2.0**-100
SUPPORTED_BITS = (8,)
#: How activations are scaled: one scale per token (row), or one for the whole input.
ACTIVATIONS = ("token", "tensor")
#: ``Dynamic(per_tensor=AUTO)`` chooses the per-tensor layers from calibration data.
AUTO = "auto"
#: ``Dynamic.tolerance`` by default: at most 10% more output error than all per token.
AUTO_TOLERANCE = 0.1


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes (zero point 128) and per-token scales (float32, ``x.shape[:-1] + (1,)``)
    of ``x``, with the float32 operations of the ONNX form, so both give the same codes::

        amax  = max(max|x_t|, AMAX_FLOOR)
        codes = clamp(round(x * (127 / amax)) + 128, 0, 255)      scale = amax / 127
    """
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR)
    qmax = torch.tensor(float(ACT_QMAX))
    codes = torch.clamp(torch.round(x * (qmax / amax)) + ACT_ZERO_POINT, 0, 255)
    return codes.to(torch.uint8), amax / qmax


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes, scale and zero point of ``x`` as a whole, bit for bit as ONNX's
    ``DynamicQuantizeLinear`` computes them (float32; round half to even)::

        lo, hi = min(min(x), 0), max(max(x), 0)       scale = (hi - lo) / 255  (1 if 0)
        zero   = clamp(round(-lo / scale), 0, 255)    codes = clamp(round(x / scale) + zero)
    """
    x = x.float()
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(0.0 - lo / scale), 0, 255)
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return codes.to(torch.uint8), scale, zero.to(torch.uint8)


def fake_quantize_tensor(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) after per-tensor quantization and dequantization."""
    codes, scale, zero = quantize_tensor(x)
    return (codes.float() - zero.float()) * scale


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) after per-token quantization and dequantization: ``(q - 128) * scale``."""
    codes, scale = quantize_tokens(x)
    return (codes.float() - ACT_ZERO_POINT) * scale


class DynamicQuantLinear(QuantWeightMixin, nn.Module):
    """``nn.Linear`` with int8 per-channel weights and dynamic int8 activations.

    Computes ``fake_quantize_tokens(x) @ W.T + b`` in float32 (returned in ``x``'s float dtype),
    where ``W`` is the dequantized stored weight; with ``activation="tensor"``,
    ``fake_quantize_tensor(x)`` instead (one asymmetric scale for the whole input, ONNX's
    ``DynamicQuantizeLinear``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scheme: QScheme = WEIGHT_SCHEME,
        activation: str = "token",
    ) -> None:
        super().__init__()
        if scheme != WEIGHT_SCHEME:
            raise CompactMLError(
                f"DynamicQuantLinear stores int8 symmetric per-channel weights, got "
                f"{scheme.describe()}; use compactml.quantize.dynamic.WEIGHT_SCHEME"
            )
        if activation not in ACTIVATIONS:
            raise CompactMLError(
                f"DynamicQuantLinear activation must be one of {ACTIVATIONS}, got {activation!r}"
            )
        self.activation = activation
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_storage(scheme, (self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @classmethod
    def from_float(cls, module: nn.Linear, activation: str = "token") -> DynamicQuantLinear:
        """Quantize ``module``'s weight to int8 per channel (the module itself is unchanged)."""
        layer = cls(
            module.in_features, module.out_features, module.bias is not None, activation=activation
        )
        layer._store(QWeight.from_float(module.weight, WEIGHT_SCHEME))
        layer.bias = _bias_from(module)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token quantized ``x`` times the dequantized weight, plus the bias (float32
        arithmetic; the result has ``x``'s dtype)."""
        if not x.is_floating_point():
            raise CompactMLError(
                f"DynamicQuantLinear needs a float input, got {x.dtype}; pass activations"
            )
        bias = None if self.bias is None else self.bias.float()
        fake = fake_quantize_tensor if self.activation == "tensor" else fake_quantize_tokens
        y = F.linear(fake(x), self.weight, bias)
        return y.to(x.dtype)

    def compactml_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON-able values (``activation`` only when not per token,
        so artifacts written before it existed describe the same layer)."""
        spec = linear_spec(self)
        if self.activation != "token":
            spec["activation"] = self.activation
        return spec

    @classmethod
    def from_compactml_spec(cls, args: dict[str, Any]) -> DynamicQuantLinear:
        """An empty layer of the described shapes (its buffers are filled by load_state_dict)."""
        scheme = scheme_from_dict(args["scheme"])
        if not isinstance(scheme, QScheme):
            raise ValueError("DynamicQuantLinear needs an integer weight scheme")
        activation = args.get("activation", "token")
        if activation not in ACTIVATIONS:
            raise ValueError(f"DynamicQuantLinear activation must be one of {ACTIVATIONS}")
        return cls(
            args["in_features"], args["out_features"], bool(args["bias"]), scheme, activation
        )

    def extra_repr(self) -> str:
        """Shapes, and the weight and activation schemes (shown by ``print``)."""
        act = (
            "uint8 per-tensor dynamic (asymmetric)"
            if self.activation == "tensor"
            else f"uint8 per-token dynamic (zero point {ACT_ZERO_POINT})"
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._scheme_repr()}, activation={act}"
        )


@dataclasses.dataclass(frozen=True)
class Dynamic(Technique):
    """Dynamic INT8 quantization of linear layers: int8 per-channel weights, activations
    quantized per token when the layer runs (no calibration data, except to choose
    ``per_tensor="auto"`` layers).

    Args:
        bits: 8 (the only width: integer kernels multiply 8-bit activations by 8-bit weights).
        per_tensor: fnmatch patterns (like ``include``) of the layers whose activations get
            one asymmetric scale for the whole input instead of one per token: ONNX's
            ``DynamicQuantizeLinear``, which ONNX Runtime fuses with the matmul and the bias
            into one ``DynamicQuantizeMatMul`` (fewer, faster ops; less exact where tokens'
            ranges differ). On all-MiniLM-L6-v2, ``("*attention.self.*",)`` (q, k, v) kept
            the cosine fidelity (0.9977) while every layer per tensor gave 0.9931.
            ``"auto"`` chooses them from ``task.calib`` instead
            (:mod:`compactml.quantize.dynamic_choice`): as many layers as possible, cheapest
            first, while the model's output error stays within ``tolerance``.
        tolerance: with ``per_tensor="auto"``, how much the model's relative output error on
            ``task.calib`` (against the float model) may grow over all-per-token, as a
            fraction (0.1: at most 10% more).
        calib_batches: with ``per_tensor="auto"``, batches of ``task.calib`` to use (None: all).
        progress: with ``per_tensor="auto"``, show a progress bar over the calibration batches.
        include, exclude: fnmatch patterns on module names.

    Exported to ONNX as ``MatMulInteger`` on uint8 activations and int8 weights
    (:mod:`compactml.export.onnx_dynamic`). Only ``nn.Linear`` layers are changed; a layer
    whose weight cannot be quantized (not finite, or too large for float16 scales) stays in
    float and is named in a warning and in the model's history.
    """

    family = "quantize"
    level = "bits"
    bits: int = 8
    per_tensor: tuple[str, ...] | str = ()
    tolerance: float = AUTO_TOLERANCE
    calib_batches: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per_tensor != AUTO:
            patterns = check_patterns(self.per_tensor, "per_tensor")
            object.__setattr__(self, "per_tensor", patterns)
        tolerance = self.tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float):
            tolerance = None
        if tolerance is None or not 0 <= tolerance <= 100:
            raise CompactMLError(
                f"tolerance must be a number from 0 to 100 (a fraction: 0.05 allows 5% more "
                f"output error), got {self.tolerance!r}"
            )
        check_positive_ints(self, "calib_batches")
        check_bools(self, "progress")
        tuned = self.tolerance != AUTO_TOLERANCE or self.calib_batches is not None
        if self.per_tensor != AUTO and tuned:
            raise CompactMLError(
                "tolerance and calib_batches choose the per-tensor layers; they apply only with "
                "per_tensor='auto' (fixed patterns need no calibration data)"
            )
        if type(self.bits) is not int or self.bits not in SUPPORTED_BITS:
            raise CompactMLError(
                f"Dynamic supports 8 bits only, got bits={self.bits!r}; use bits=8, or "
                "WeightOnly(bits=...) for other widths"
            )

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A copy of ``model`` whose selected Linear layers are :class:`DynamicQuantLinear`
        (``task`` is only needed, for its calib batches, with ``per_tensor="auto"``)."""
        new = self.copy_model(model)
        chosen = self.targets(new, (nn.Linear,))
        if not chosen:
            raise CompactMLError(
                f"Dynamic found no Linear layer selected by include={list(self.include)} "
                f"exclude={list(self.exclude)}; check the patterns against the model's "
                "module names"
            )
        names = {id(layer): name for name, layer in chosen}
        patterns = () if self.per_tensor == AUTO else self.per_tensor
        built, skipped = build_layers(
            chosen,
            lambda layer: DynamicQuantLinear.from_float(
                layer, "tensor" if matches(names[id(layer)], patterns) else "token"
            ),
        )
        check_some_built(built, skipped)
        for name, layer in built.items():
            new = set_layer(new, name, layer)
        details = None
        if self.per_tensor == AUTO:
            from compactml.quantize.dynamic_choice import choose_per_tensor

            details = choose_per_tensor(
                model, new, built, task, self.tolerance, self.calib_batches, self.progress
            )
        warn_skipped(self, skipped)
        record(new, self, list(built), skipped, details)
        return new
