"""``QWeight``: a compressed weight as plain data, read alike by modules, profiler and exporters.

Not a tensor subclass: four tensors and a scheme. For an integer scheme ``data`` holds the codes
packed by :func:`compactml.quantize.affine.pack` (uint8), ``scale`` the per-block scales in the
scheme's ``scale_dtype`` (float16 by default: 2 bytes per group instead of 4 is what brings a
4-bit group-32 model to about 0.14x of float32), and ``zero`` the per-block zero points as uint8
(None for symmetric schemes, whose zero is the middle code). For a float scheme ``data`` is the
weight itself in float16/bfloat16 and ``scale``/``zero`` are None. ``codebook`` (optional) maps
codes to values (weight clustering): the weight is then ``codebook[codes]``.

:meth:`QWeight.dequantize` always computes in float32 from the stored tensors, so PyTorch
outputs, the saved artifact and exported runtimes see the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compactml.errors import CompactMLError
from compactml.quantize import affine
from compactml.quantize.affine import SCALE_DTYPES, FloatScheme, PerChannel, QScheme, Scheme
from compactml.quantize.clip import clipped_qparams


@dataclass(eq=False)
class QWeight:
    """A compressed weight: ``data``, ``scale``, ``zero``, ``scheme``, original ``shape``,
    optional ``codebook`` (see the module docstring for each field's layout)."""

    data: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    scheme: Scheme
    shape: tuple[int, ...]
    codebook: torch.Tensor | None = None

    @classmethod
    def from_float(cls, w: torch.Tensor, scheme: Scheme, clip: str = "none") -> QWeight:
        """Quantize the float weight ``w`` with round-to-nearest; ``clip="mse"`` searches a
        per-block clipping range first (:func:`compactml.quantize.clip.mse_clip`). ``w`` must
        be finite; the result never shares memory with it."""
        w = w.detach()
        if not w.is_floating_point():
            raise CompactMLError(f"cannot quantize a {w.dtype} weight; weights must be float")
        if not bool(torch.isfinite(w).all()):
            raise CompactMLError(
                "the weight has NaN or inf values; fix the model's weights or exclude the layer"
            )
        if isinstance(scheme, FloatScheme):  # a copy: never the caller's tensor
            data = w.to(scheme.torch_dtype, copy=True).contiguous()
            return cls(data, None, None, scheme, tuple(w.shape))
        scale, zero = clipped_qparams(w.float(), scheme, clip)
        return cls.from_codes(affine.quantize(w.float(), scale, zero, scheme), scale, zero, scheme)

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QScheme
    ) -> QWeight:
        """The QWeight of integer ``codes`` (the weight's shape, unpacked) chosen elsewhere (by
        GPTQ, AWQ...) with ``scale``/``zero`` in ``scheme``'s parameter shape: packs the codes
        and stores the scale in the scheme's scale dtype."""
        data = affine.pack(codes.to(torch.uint8), scheme.bits)
        stored_scale = scale.to(SCALE_DTYPES[scheme.scale_dtype]).contiguous()
        stored_zero = None if zero is None else zero.contiguous()
        return cls(data, stored_scale, stored_zero, scheme, tuple(codes.shape))

    @staticmethod
    def empty_tensors(scheme: Scheme, shape: tuple[int, ...]) -> dict[str, torch.Tensor | None]:
        """Uninitialized ``data``/``scale``/``zero`` of the right shapes and dtypes for a weight
        of ``shape`` (for modules rebuilt from an artifact before its tensors are loaded)."""
        if isinstance(scheme, FloatScheme):
            return {
                "data": torch.empty(shape, dtype=scheme.torch_dtype),
                "scale": None,
                "zero": None,
            }
        numel = math.prod(shape)
        pshape = affine.param_shape(shape, scheme.granularity)
        return {
            "data": torch.empty(affine.packed_numel(numel, scheme.bits), dtype=torch.uint8),
            "scale": torch.empty(pshape, dtype=SCALE_DTYPES[scheme.scale_dtype]),
            "zero": None if scheme.symmetric else torch.empty(pshape, dtype=torch.uint8),
        }

    @property
    def numel(self) -> int:
        """Number of weights."""
        return math.prod(self.shape)

    def codes(self) -> torch.Tensor:
        """The integer codes, unpacked, as uint8 of ``shape`` (integer schemes only)."""
        if not isinstance(self.scheme, QScheme):
            raise CompactMLError("a float-stored weight has no integer codes")
        return affine.unpack(self.data, self.scheme.bits, self.numel).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 of ``shape``, computed from the stored tensors."""
        if isinstance(self.scheme, FloatScheme):
            return self.data.float()
        codes = self.codes()
        if self.codebook is not None:
            return self.codebook.float()[codes.long()]
        return affine.dequantize(codes, self.scale, self.zero, self.scheme)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 rows ``weight[index]`` (an embedding lookup), decoding only those rows when
        each row starts on a byte boundary and has its own scales; else via :meth:`dequantize`."""
        scheme = self.scheme
        if isinstance(scheme, FloatScheme):
            return self.data[index].float()
        row = self.numel // self.shape[0]
        per_row = isinstance(scheme.granularity, affine.PerGroup) or (
            scheme.granularity == PerChannel(0)
        )
        if self.codebook is not None or not per_row or (row * scheme.bits) % 8:
            return self.dequantize()[index]
        row_bytes = affine.packed_numel(row, scheme.bits)
        packed = self.data.reshape(self.shape[0], row_bytes)[index.reshape(-1)]
        codes = affine.unpack(packed, scheme.bits, packed.shape[0] * row).reshape(-1, row)
        sub_shape = (codes.shape[0], *self.shape[1:])
        scale = self.scale.reshape(self.shape[0], -1)[index.reshape(-1)]
        zero = (
            None if self.zero is None else self.zero.reshape(self.shape[0], -1)[index.reshape(-1)]
        )
        values = affine.dequantize(codes.reshape(sub_shape), scale, zero, scheme)
        return values.reshape(*index.shape, *self.shape[1:])

    def storage_bytes(self) -> int:
        """Exact bytes held: data + scale + zero (+ codebook), as stored."""
        tensors = (self.data, self.scale, self.zero, self.codebook)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def bits_per_weight(self) -> float:
        """Average stored bits per weight, scales and zero points included."""
        return 8.0 * self.storage_bytes() / max(self.numel, 1)
