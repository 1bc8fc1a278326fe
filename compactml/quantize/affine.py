"""Affine (uniform) quantization math: pure functions on tensors, no modules.

A real value ``w`` is stored as an unsigned integer code ``q`` in ``[0, 2**bits - 1]`` with
``w ~= (q - zero) * scale``. One convention everywhere (it is also ONNX Runtime's
``MatMulNBits`` convention): codes are always unsigned, and

- symmetric schemes have no stored zero point: it is the middle code ``2**(bits-1)`` and the
  scale is ``max|w| / (2**(bits-1) - 1)``, so codes ``1 .. 2**bits - 1`` are used (the
  "restricted range": -7..7 around the zero for 4 bits, like int8 weights in -127..127);
- asymmetric schemes store a zero point per scale; the range is widened to include 0, so 0 is
  exactly representable (padding and ReLU zeros stay exact).

Granularity is a type: :class:`PerTensor`, :class:`PerChannel` (one scale per slice along
``axis``) or :class:`PerGroup` (``size`` consecutive weights along the input dimension: the last
axis of a Linear weight, the flattened ``in_channels * kh * kw`` of a conv weight).

Scales are rounded *up* to a value the scheme's ``scale_dtype`` holds exactly (float16 by
default), so the stored scale is the scale that was used: PyTorch, the artifact and exported
runtimes agree, and no weight is clipped by the rounding.

Packing (see :func:`pack`): 4-bit codes go two per byte, the first in the low nibble; 2-bit
codes four per byte, the first in the lowest two bits; 8-bit codes are the bytes themselves;
3, 5, 6 and 7-bit codes are stored one per byte (no cross-byte bit packing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from compactml.errors import CompactMLError

MIN_BITS, MAX_BITS = 2, 8
GROUP_SIZES = (16, 32, 64, 128, 256)
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
PACKED_PER_BYTE = {2: 4, 4: 2}  # bit widths stored several codes to a byte


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero point) for the whole tensor."""

    def describe(self) -> str:
        """Short text for module printing, e.g. ``per-tensor``."""
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along ``axis`` (axis 0: per output channel of Linear/Conv weights)."""

    axis: int = 0

    def describe(self) -> str:
        """Short text for module printing, e.g. ``per-channel``."""
        return "per-channel" if self.axis == 0 else f"per-channel(axis={self.axis})"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive weights of a row (a power of two from 16 to 256)."""

    size: int

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or self.size not in GROUP_SIZES:
            raise CompactMLError(
                f"group size {self.size!r} is not supported; use one of "
                f"{', '.join(map(str, GROUP_SIZES))} (or per-channel scales)"
            )

    def describe(self) -> str:
        """Short text for module printing, e.g. ``g32``."""
        return f"g{self.size}"


Granularity = PerTensor | PerChannel | PerGroup


def weight_granularity(group_size: int | None) -> PerChannel | PerGroup:
    """``PerGroup(group_size)``, or ``PerChannel(0)`` for None; a config's ``group_size`` check."""
    if group_size is None:
        return PerChannel(0)
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise CompactMLError(
            f"group_size={group_size!r} is not supported; use one of "
            f"{', '.join(map(str, GROUP_SIZES))}, or None for per-channel scales"
        )
    return PerGroup(group_size)


@dataclass(frozen=True)
class QScheme:
    """How to quantize a weight: ``bits`` (2..8), ``symmetric``, ``granularity``, and the dtype
    the scales are stored in (``"float16"`` or ``"float32"``)."""

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = PerChannel()
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise CompactMLError(
                f"bits={bits!r} is not supported; use an integer from {MIN_BITS} to {MAX_BITS}"
            )
        if not isinstance(self.granularity, PerTensor | PerChannel | PerGroup):
            raise CompactMLError(
                f"granularity {self.granularity!r} is not one of PerTensor(), PerChannel(axis), "
                "PerGroup(size)"
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise CompactMLError(
                f"scale_dtype {self.scale_dtype!r} is not supported; use one of "
                f"{', '.join(SCALE_DTYPES)}"
            )

    @property
    def qmax(self) -> int:
        """The largest code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        """The implicit zero point of symmetric schemes, ``2**(bits-1)``."""
        return 1 << (self.bits - 1)

    def describe(self) -> str:
        """Short text for module printing, e.g. ``int4 sym g32``."""
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {kind} {self.granularity.describe()}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (read back by :func:`scheme_from_dict`)."""
        gran = self.granularity
        if isinstance(gran, PerGroup):
            g: dict[str, Any] = {"type": "group", "size": gran.size}
        elif isinstance(gran, PerChannel):
            g = {"type": "channel", "axis": gran.axis}
        else:
            g = {"type": "tensor"}
        return {"kind": "int", "bits": self.bits, "symmetric": self.symmetric} | {
            "granularity": g,
            "scale_dtype": self.scale_dtype,
        }


FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FloatScheme:
    """Weights stored as a narrower float (``"float16"`` or ``"bfloat16"``), no scale."""

    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise CompactMLError(
                f"dtype {self.dtype!r} is not supported; use one of {', '.join(FLOAT_DTYPES)}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored weights."""
        return FLOAT_DTYPES[self.dtype]

    def describe(self) -> str:
        """Short text for module printing, e.g. ``float16``."""
        return self.dtype

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (read back by :func:`scheme_from_dict`)."""
        return {"kind": "float", "dtype": self.dtype}


Scheme = QScheme | FloatScheme


def scheme_from_dict(data: dict[str, Any]) -> Scheme:
    """The scheme written by ``to_dict`` (raises ValueError/KeyError for malformed data)."""
    if data["kind"] == "float":
        return FloatScheme(data["dtype"])
    if data["kind"] != "int":
        raise ValueError(f"unknown scheme kind {data['kind']!r}")
    g = data["granularity"]
    gran: Granularity
    if g["type"] == "group":
        gran = PerGroup(int(g["size"]))
    elif g["type"] == "channel":
        gran = PerChannel(int(g["axis"]))
    elif g["type"] == "tensor":
        gran = PerTensor()
    else:
        raise ValueError(f"unknown granularity {g['type']!r}")
    return QScheme(int(data["bits"]), bool(data["symmetric"]), gran, str(data["scale_dtype"]))


# ---------------------------------------------------------------- blocks of one scale each


def _group_advice(width: int) -> str:
    sizes = [str(s) for s in GROUP_SIZES if width % s == 0]
    if sizes:
        return f"use a group size that divides it ({', '.join(sizes)}) or per-channel scales"
    return "no group size from 16 to 256 divides it; use per-channel scales (group_size=None)"


def param_shape(shape: tuple[int, ...], granularity: Granularity) -> tuple[int, ...]:
    """Shape of the scale (and zero point) tensor for a weight of ``shape``.

    PerTensor: ``()``; PerChannel(axis): ``(shape[axis],)``; PerGroup(size):
    ``(shape[0], row_length // size)`` with ``row_length = prod(shape[1:])``.
    Raises CompactMLError when the group size does not divide the row length (no padding).
    """
    if isinstance(granularity, PerTensor):
        return ()
    if isinstance(granularity, PerChannel):
        if not -len(shape) <= granularity.axis < len(shape):
            raise CompactMLError(
                f"per-channel axis {granularity.axis} does not exist in a weight of shape "
                f"{tuple(shape)}; use an axis below {len(shape)}"
            )
        return (shape[granularity.axis],)
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    if len(shape) < 2 or width % granularity.size:
        raise CompactMLError(
            f"group size {granularity.size} does not divide the row length {width} of a weight "
            f"of shape {tuple(shape)} (compactml refuses rather than pads); {_group_advice(width)}"
        )
    return (shape[0], width // granularity.size)


def to_blocks(w: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """``w`` as a 2-D tensor with one row per scale: ``(number of scales, weights per scale)``."""
    param_shape(tuple(w.shape), granularity)  # validates
    if isinstance(granularity, PerTensor):
        return w.reshape(1, -1)
    if isinstance(granularity, PerChannel):
        return w.movedim(granularity.axis, 0).reshape(w.shape[granularity.axis], -1)
    return w.reshape(-1, granularity.size)


def from_blocks(
    blocks: torch.Tensor, shape: tuple[int, ...], granularity: Granularity
) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: the tensor of ``shape`` the blocks were cut from."""
    if isinstance(granularity, PerChannel):
        axis = granularity.axis % len(shape)
        moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
        return blocks.reshape(moved).movedim(0, axis)
    return blocks.reshape(shape)


# ---------------------------------------------------------------- scales and zero points


def round_scale_up(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """``scale`` (float32) rounded up to a value ``scale_dtype`` holds exactly, floored at its
    smallest positive value; returned as float32."""
    dtype = SCALE_DTYPES[scale_dtype]
    tiny = 2.0**-24 if dtype == torch.float16 else torch.finfo(torch.float32).tiny
    scale = scale.float().clamp(min=tiny)
    if dtype == torch.float32:
        return scale
    if bool((scale > torch.finfo(dtype).max).any()):
        raise CompactMLError(
            "weights are too large for float16 scales (a scale above 65504); exclude the layer "
            "or rescale its weights"
        )
    stored = scale.to(dtype)
    low = stored.float() < scale
    bumped = torch.nextafter(stored, torch.tensor(math.inf, dtype=dtype))
    return torch.where(low, bumped, stored).float()


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, scheme: QScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point per block for the real range ``[lo, hi]`` (1-D tensors).

    Symmetric: ``scale = max(|lo|, |hi|) / (2**(bits-1) - 1)``, zero None (the middle code).
    Asymmetric: the range is widened to include 0, ``scale = (hi - lo) / (2**bits - 1)`` and
    ``zero = round(-lo / scale)`` as uint8. A zero-width range gets the smallest scale.
    """
    if scheme.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs()).float()
        return round_scale_up(amax / (scheme.mid - 1), scheme.scale_dtype), None
    lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)
    scale = round_scale_up((hi - lo) / scheme.qmax, scheme.scale_dtype)
    zero = torch.round(-lo / scale).clamp(0, scheme.qmax).to(torch.uint8)
    return scale, zero


def block_qparams(
    blocks: torch.Tensor, scheme: QScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scale and zero point of each row of ``blocks`` (1-D results)."""
    return qparams_from_range(blocks.amin(dim=1), blocks.amax(dim=1), scheme)


def choose_qparams(w: torch.Tensor, scheme: QScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (float32, exactly representable in ``scheme.scale_dtype``) and zero point (uint8,
    or None for symmetric schemes) from the min/max of each block of ``w``.

    Both have the shape :func:`param_shape` gives for ``w``.
    """
    scale, zero = block_qparams(to_blocks(w.detach(), scheme.granularity), scheme)
    shape = param_shape(tuple(w.shape), scheme.granularity)
    return scale.reshape(shape), (zero.reshape(shape) if zero is not None else None)


# ---------------------------------------------------------------- quantize / dequantize


def _zero_column(zero: torch.Tensor | None, scheme: QScheme, n: int) -> torch.Tensor:
    if zero is None:
        return torch.full((n, 1), float(scheme.mid))
    return zero.reshape(-1, 1).float()


def quantize_blocks(
    blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QScheme
) -> torch.Tensor:
    """Codes (float, integral values) of ``blocks`` for per-row ``scale``/``zero``."""
    z = _zero_column(zero, scheme, blocks.shape[0]).to(blocks.device)
    x = blocks.float() / scale.reshape(-1, 1).float() + z
    return torch.round(x).clamp(0, scheme.qmax)


def dequantize_blocks(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QScheme
) -> torch.Tensor:
    """Float32 values of per-row ``codes``: ``(codes - zero) * scale``."""
    z = _zero_column(zero, scheme, codes.shape[0]).to(codes.device)
    return (codes.float() - z) * scale.reshape(-1, 1).float()


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QScheme
) -> torch.Tensor:
    """Integer codes (uint8, same shape as ``w``): ``clamp(round(w / scale) + zero, 0, qmax)``."""
    blocks = to_blocks(w.detach(), scheme.granularity)
    codes = quantize_blocks(blocks, scale, zero, scheme).to(torch.uint8)
    return from_blocks(codes, tuple(w.shape), scheme.granularity)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QScheme
) -> torch.Tensor:
    """Float32 weights from ``codes``: ``(codes - zero) * scale``, computed in float32."""
    blocks = to_blocks(codes, scheme.granularity)
    values = dequantize_blocks(blocks, scale, zero, scheme)
    return from_blocks(values, tuple(codes.shape), scheme.granularity)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QScheme
) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype, differentiable with a straight-through
    estimator (Bengio et al. 2013): the gradient to ``w`` is 1 where ``w`` is inside the
    representable range and 0 where it was clipped; ``scale`` also receives gradients.
    """
    blocks = to_blocks(w, scheme.granularity)
    s = scale.reshape(-1, 1).to(blocks.dtype)
    z = _zero_column(zero, scheme, blocks.shape[0]).to(blocks)
    x = blocks / s + z
    q = (x + (torch.round(x) - x).detach()).clamp(0, scheme.qmax)
    return from_blocks((q - z) * s, tuple(w.shape), scheme.granularity)


# ---------------------------------------------------------------- packing


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` take when packed by :func:`pack`."""
    per_byte = PACKED_PER_BYTE.get(bits, 1)
    return -(-numel // per_byte)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any shape, values in ``[0, 2**bits - 1]``) as a flat uint8 tensor.

    4 bits: byte ``i`` holds code ``2i`` in its low nibble and ``2i+1`` in its high nibble.
    2 bits: byte ``i`` holds codes ``4i .. 4i+3`` from the lowest bit pair up.
    Other widths: one code per byte. The tail is padded with zero codes.
    """
    if not MIN_BITS <= bits <= MAX_BITS:
        raise CompactMLError(f"cannot pack {bits}-bit codes; use {MIN_BITS} to {MAX_BITS} bits")
    flat = codes.reshape(-1).to(torch.uint8)
    per_byte = PACKED_PER_BYTE.get(bits)
    if per_byte is None:
        return flat.clone()
    pad = -flat.numel() % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    lanes = flat.reshape(-1, per_byte)
    out = torch.zeros(lanes.shape[0], dtype=torch.uint8, device=codes.device)
    for lane in range(per_byte):
        out |= lanes[:, lane] << (lane * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The first ``numel`` codes (flat uint8) of bytes written by :func:`pack`."""
    per_byte = PACKED_PER_BYTE.get(bits)
    flat = packed.reshape(-1)
    if per_byte is None:
        return flat[:numel]
    mask = (1 << bits) - 1
    lanes = [(flat >> (lane * bits)) & mask for lane in range(per_byte)]
    return torch.stack(lanes, dim=1).reshape(-1)[:numel]
