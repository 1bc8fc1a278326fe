"""Activation fake quantization: ``ActQuant``, per-tensor, with fixed or learned step size.

One scale and one zero point for the whole tensor, as ONNX ``QuantizeLinear`` /
``DequantizeLinear`` define them, so an exporter can emit the pair from ``scale``,
``zero_point``, ``bits`` and ``signed`` and get the same numbers::

    q  = clamp(round_half_to_even(x / scale) + zero_point, qmin, qmax)
    x' = (q - zero_point) * scale

(``torch.round`` rounds half to even, like ONNX; the zero point is added *after* rounding.)
Codes are ``0 .. 2**bits - 1`` when ``signed`` is False (uint8 for 8 bits, what ONNX Runtime's
fast U8S8 kernels want) and ``-2**(bits-1) .. 2**(bits-1) - 1`` when True.

With ``learn=True`` the scale is a Parameter trained as in LSQ (Esser et al. 2020, "Learned Step
Size Quantization", ICLR): rounding passes gradients straight through (Bengio et al. 2013), so
autograd gives the step size LSQ's gradient, scaled by ``1 / sqrt(features * Q_P)`` where
``features`` is the number of elements of one sample and ``Q_P = qmax - zero_point`` the number
of positive levels. The zero point is fixed (set from calibration). :meth:`ActQuant.freeze`
turns the learned scale back into a buffer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.quantize.affine import MAX_BITS, MIN_BITS

#: The smallest scale used (smaller ones, or negative ones reached by training, are raised to it).
MIN_SCALE = 2.0**-24


class GradScale(torch.autograd.Function):
    """Identity in the forward pass (bit-exact); multiplies the gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # noqa: D102
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``factor`` (LSQ's step-size scaling)."""
    return GradScale.apply(x, factor)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round(x)`` (half to even) whose gradient is the identity (straight-through).

    The value is exactly ``round(x)``: ``round(x) - x`` is exact in floating point.
    """
    return x + (torch.round(x) - x).detach()


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``bits``-bit codes: ``0 .. 2**bits-1`` or, signed, ``-2**(bits-1) ..
    2**(bits-1)-1``."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def act_qparams(lo: float, hi: float, bits: int = 8, signed: bool = False) -> tuple[float, int]:
    """Scale and zero point that cover the real range ``[lo, hi]`` (widened to include 0, so 0
    is exact): ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - round(lo / scale)``.

    A zero-width range gets scale 1 (any scale represents a constant 0 exactly).
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CompactMLError(
            f"activation range [{lo}, {hi}] is not finite; check the model and calibration data"
        )
    qmin, qmax = code_range(bits, signed)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0.0:
        return 1.0, 0
    scale = max(float(torch.tensor((hi - lo) / (qmax - qmin), dtype=torch.float32)), MIN_SCALE)
    zero_point = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return scale, zero_point


class ActQuant(nn.Module):
    """Per-tensor fake quantization of activations (see the module docstring for the math).

    Args:
        bits: 2 to 8 bits per code.
        signed: signed codes (int8 for 8 bits) instead of unsigned (uint8).
        scale: the step size (float32, > 0).
        zero_point: the integer code of real 0, inside the code range.
        learn: train the scale (LSQ); a Parameter until :meth:`freeze`, else a buffer.

    Buffers: ``scale`` (float32 scalar, unless learned) and ``zero_point`` (int32 scalar).
    """

    def __init__(
        self,
        bits: int = 8,
        signed: bool = False,
        scale: float = 1.0,
        zero_point: int = 0,
        learn: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise CompactMLError(
                f"activation bits={bits!r} is not supported; use an integer from {MIN_BITS} "
                f"to {MAX_BITS}"
            )
        qmin, qmax = code_range(bits, bool(signed))
        if not qmin <= int(zero_point) <= qmax:
            raise CompactMLError(
                f"zero_point {zero_point} is outside the {bits}-bit code range [{qmin}, {qmax}]; "
                "pick one inside it"
            )
        if not (math.isfinite(scale) and scale > 0):
            raise CompactMLError(f"activation scale must be a positive number, got {scale!r}")
        self.bits, self.signed, self.learn = int(bits), bool(signed), bool(learn)
        value = torch.tensor(float(scale), dtype=torch.float32)
        if self.learn:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=torch.int32))

    @property
    def qmin(self) -> int:
        """The smallest code."""
        return code_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        """The largest code."""
        return code_range(self.bits, self.signed)[1]

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The scale used on ``x``: floored at :data:`MIN_SCALE`; LSQ gradient scaling when
        learned (the value is the same either way)."""
        s = self.scale.clamp(min=MIN_SCALE)
        if self.learn and torch.is_grad_enabled():
            features = x[0].numel() if x.dim() > 1 else x.numel()
            positive = max(self.qmax - int(self.zero_point), 1)
            s = grad_scale(s, 1.0 / math.sqrt(max(features, 1) * positive))
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` with straight-through rounding."""
        s = self.step(x).to(x.dtype)
        zp = self.zero_point.to(x.dtype)
        q = (round_ste(x / s) + zp).clamp(self.qmin, self.qmax)
        return (q - zp) * s

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``x`` (int32), as ONNX ``QuantizeLinear`` computes them."""
        s = self.scale.detach().clamp(min=MIN_SCALE)
        q = torch.round(x.detach().float() / s) + self.zero_point.float()
        return q.clamp(self.qmin, self.qmax).to(torch.int32)

    @torch.no_grad()
    def freeze(self) -> ActQuant:
        """Make a learned scale a plain buffer again (its value floored at :data:`MIN_SCALE`,
        which is what ``forward`` used); returns ``self``."""
        if self.learn:
            value = self.scale.detach().clamp(min=MIN_SCALE).clone()
            del self._parameters["scale"]
            self.register_buffer("scale", value)
            self.learn = False
        return self

    def extra_repr(self) -> str:
        """Bits, signedness, scale and zero point (shown by ``print``)."""
        kind = "int" if self.signed else "uint"
        learned = ", learned" if self.learn else ""
        return (
            f"{kind}{self.bits}, scale={float(self.scale.detach()):.6g}, "
            f"zero_point={int(self.zero_point)}{learned}"
        )
