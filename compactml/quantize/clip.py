"""Clipping search: shrink each block's range when that lowers the block's squared error.

Heavy-tailed weights waste most codes on a few outliers; clipping the range trades a large
error on those few for a finer step on all the others. This is the grid search of llama.cpp /
AWQ's ``auto_clip``: per block, try ranges ``r * [min, max]`` for ``r`` from 1.0 down to
``min_ratio`` and keep the one with the least error. Data-free (``WeightOnly(clip="mse")``),
the error is the squared error of the block's own weights; given the Gram matrix ``G = X^T X``
of the inputs the block's columns read (AWQ), it is the squared error the block adds to the
layer's output on those inputs, ``d^T G d`` for the weight error ``d``: large weights that
read quiet inputs can then be clipped harder, and weights that read loud ones less. Ratio 1.0
(plain min/max) is always a candidate, so no block gets worse.
"""

from __future__ import annotations

import torch

from compactml.errors import CompactMLError
from compactml.quantize.affine import (
    PerChannel,
    PerGroup,
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
    blocks: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QScheme,
    gram: torch.Tensor | None,
) -> torch.Tensor:
    """Per block: ``|d|^2``, or ``d^T G d`` with the block's column Gram matrix ``G``."""
    codes = quantize_blocks(blocks, scale, zero, scheme)
    d = dequantize_blocks(codes, scale, zero, scheme) - blocks
    if gram is None:
        return d.square().sum(dim=1)
    per_row = d.reshape(-1, gram.shape[0], gram.shape[1]).transpose(0, 1)  # (groups, rows, size)
    return (torch.bmm(per_row, gram) * per_row).sum(dim=2).transpose(0, 1).reshape(-1)


def _check_gram(gram: torch.Tensor, w: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """``gram`` as float32 ``(column blocks, size, size)``, checked against ``w`` and the
    scheme (per-group or per-output-channel blocks of a 2-D weight)."""
    gran = scheme.granularity
    if isinstance(gran, PerGroup):
        shape = (w.shape[-1] // gran.size, gran.size, gran.size)
    elif isinstance(gran, PerChannel) and gran.axis % w.dim() == 0:
        shape = (1, w.shape[-1], w.shape[-1])
    else:
        shape = None
    if w.dim() != 2 or shape is None or tuple(gram.shape) != shape:
        raise CompactMLError(
            f"an input Gram matrix for clipping a {tuple(w.shape)} weight in "
            f"{gran.describe()} blocks must be (column blocks, size, size) {shape}, got "
            f"{tuple(gram.shape)}; only 2-D weights with per-group or per-row scales take one"
        )
    return gram.detach().float().to(w.device)


def mse_clip(
    w: torch.Tensor,
    scheme: QScheme,
    grid: int = 100,
    min_ratio: float = 0.5,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point per block of ``w`` minimizing ``sum((w - dequant(quant(w)))**2)``
    over ``grid`` shrink ratios evenly spaced from 1.0 down to ``min_ratio``.

    With ``gram`` (``(column blocks, size, size)`` for a 2-D ``w``: block ``j`` of every row
    reads columns ``j * size .. (j + 1) * size - 1``, ``gram[j]`` is ``X^T X`` of those input
    columns; one ``(1, in, in)`` matrix for per-row scales) the error minimized is the block's
    output error ``d^T gram[j] d`` instead.

    Returns the same shapes and dtypes as :func:`compactml.quantize.affine.choose_qparams`.
    """
    if not isinstance(grid, int) or grid < 1 or not 0.0 < min_ratio <= 1.0:
        raise CompactMLError(
            f"clip search needs grid >= 1 and 0 < min_ratio <= 1, got grid={grid!r}, "
            f"min_ratio={min_ratio!r}"
        )
    if gram is not None:
        gram = _check_gram(gram, w, scheme)
    blocks = to_blocks(w.detach(), scheme.granularity).float()
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
    best_scale, best_zero = qparams_from_range(lo, hi, scheme)
    best_err = _block_error(blocks, best_scale, best_zero, scheme, gram)
    for ratio in torch.linspace(1.0, min_ratio, grid)[1:].tolist():
        scale, zero = qparams_from_range(lo * ratio, hi * ratio, scheme)
        err = _block_error(blocks, scale, zero, scheme, gram)
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
