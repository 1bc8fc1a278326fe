"""Clipping search: shrink each block's range when that lowers the weight's squared error.

Heavy-tailed weights waste most codes on a few outliers; clipping the range trades a large
error on those few for a finer step on all the others. This is the data-free grid search of
llama.cpp / AWQ's ``auto_clip`` without activations: per block, try ranges ``r * [min, max]``
for ``r`` from 1.0 down to ``min_ratio`` and keep the one with the least squared error of the
block's own weights. Ratio 1.0 (plain min/max) is always a candidate, so no block gets worse.
"""

from __future__ import annotations

import torch

from compactml.errors import CompactMLError
from compactml.quantize.affine import (
    QScheme,
    choose_qparams,
    dequantize_blocks,
    param_shape,
    qparams_from_range,
    quantize_blocks,
    to_blocks,
)

CLIP_METHODS = ("none", "mse")


def _block_error(
    blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QScheme
) -> torch.Tensor:
    codes = quantize_blocks(blocks, scale, zero, scheme)
    return (dequantize_blocks(codes, scale, zero, scheme) - blocks).square().sum(dim=1)


def mse_clip(
    w: torch.Tensor, scheme: QScheme, grid: int = 100, min_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point per block of ``w`` minimizing ``sum((w - dequant(quant(w)))**2)``
    over ``grid`` shrink ratios evenly spaced from 1.0 down to ``min_ratio``.

    Returns the same shapes and dtypes as :func:`compactml.quantize.affine.choose_qparams`.
    """
    if not isinstance(grid, int) or grid < 1 or not 0.0 < min_ratio <= 1.0:
        raise CompactMLError(
            f"clip search needs grid >= 1 and 0 < min_ratio <= 1, got grid={grid!r}, "
            f"min_ratio={min_ratio!r}"
        )
    blocks = to_blocks(w.detach(), scheme.granularity).float()
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
    best_scale, best_zero = qparams_from_range(lo, hi, scheme)
    best_err = _block_error(blocks, best_scale, best_zero, scheme)
    for ratio in torch.linspace(1.0, min_ratio, grid)[1:].tolist():
        scale, zero = qparams_from_range(lo * ratio, hi * ratio, scheme)
        err = _block_error(blocks, scale, zero, scheme)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None and best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    shape = param_shape(tuple(w.shape), scheme.granularity)
    return best_scale.reshape(shape), (best_zero.reshape(shape) if best_zero is not None else None)


def clipped_qparams(
    w: torch.Tensor, scheme: QScheme, clip: str = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of ``w`` by plain min/max (``clip="none"``) or :func:`mse_clip`."""
    if clip == "mse":
        return mse_clip(w, scheme)
    if clip == "none":
        return choose_qparams(w, scheme)
    raise CompactMLError(f"clip={clip!r} is not supported; use one of {', '.join(CLIP_METHODS)}")
