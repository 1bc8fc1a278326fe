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

A grid only tries scales of one shape (both ends shrunk by the same ratio, the zero point
wherever that puts it). With ``refine``, the data-free search goes on: 4 ratios on a 3x finer
grid around each block's best, then :func:`refine_qparams`, which alternates the two halves of
the problem as Lloyd's algorithm does for a codebook (Lloyd 1982): with the codes fixed, the
scale (and integer zero point) minimizing the squared error is closed form
(:func:`least_squares_qparams`); with the scale fixed, round-to-nearest gives the best codes.
A step is kept only where it lowers the block's error, so the result is never worse than the
grid's. ``WeightOnly(clip="mse")`` runs a 20-ratio grid and 4 refinement steps, a chunk of
blocks at a time: lower weight error than the former 100-ratio grid (all-MiniLM-L6-v2, 4-bit
g32 asymmetric: 0.6197% of the weights' energy instead of 0.6263%), 9x faster (2.2 s).
"""

from __future__ import annotations

import torch

from compactml.errors import CompactMLError
from compactml.quantize.affine import (
    PerChannel,
    PerGroup,
    QScheme,
    block_qparams,
    choose_qparams,
    dequantize_blocks,
    param_shape,
    qparams_from_range,
    quantize_blocks,
    round_scale_up,
    to_blocks,
)

CLIP_METHODS = ("none", "mse")
MSE_GRID, MSE_MIN_RATIO, MSE_REFINE = 20, 0.5, 4  # what WeightOnly(clip="mse") runs
FINE_RATIOS = 4  # with refine: ratios tried on a 3x finer grid around each block's best
CHUNK = 1 << 16  # weights searched at a time: the temporaries of one chunk stay in cache


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


Best = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]


def _try_ratios(
    blocks: torch.Tensor,
    scheme: QScheme,
    ratios: list[torch.Tensor],
    gram: torch.Tensor | None,
    best: Best,
) -> Best:
    """``best`` (per block: scale, zero point, error, shrink ratio) updated with every block
    whose error drops at its range shrunk by ``ratios`` (each one per block, or one for all)."""
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
    best_scale, best_zero, best_err, best_ratio = best
    for ratio in ratios:
        scale, zero = qparams_from_range(lo * ratio, hi * ratio, scheme)
        err = _block_error(blocks, scale, zero, scheme, gram)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_ratio = torch.where(better, ratio, best_ratio)
        if zero is not None and best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero, best_err, best_ratio


def _grid_search(
    blocks: torch.Tensor,
    scheme: QScheme,
    grid: int,
    min_ratio: float,
    gram: torch.Tensor | None,
    fine: int = 0,
) -> Best:
    """Per block: the best of ``grid`` ranges shrunk by ratios from 1.0 down to ``min_ratio``
    (1.0, plain min/max, first), then of ``fine`` ratios on a 3x finer grid around it."""
    scale, zero = block_qparams(blocks, scheme)
    ones = torch.ones(blocks.shape[0], device=blocks.device)
    best = scale, zero, _block_error(blocks, scale, zero, scheme, gram), ones
    coarse = torch.linspace(1.0, min_ratio, grid)[1:].tolist()
    best = _try_ratios(blocks, scheme, [ones * r for r in coarse], gram, best)
    if fine and grid > 1:
        step = (1.0 - min_ratio) / (grid - 1) / 3
        offsets = [k * step * sign for k in range(1, fine // 2 + 1) for sign in (1, -1)]
        near = [(best[3] + off).clamp(min_ratio, 1.0) for off in offsets[:fine]]
        best = _try_ratios(blocks, scheme, near, gram, best)
    return best


def least_squares_qparams(
    blocks: torch.Tensor, codes: torch.Tensor, scheme: QScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For fixed ``codes``, the scale and zero point per block (row of ``blocks``) minimizing
    ``sum((w - (codes - zero) * scale)**2)``, before the scale is rounded to ``scale_dtype``.

    Symmetric (zero fixed at the middle code): ``scale = <w, d> / <d, d>`` with
    ``d = codes - mid``. Asymmetric: the zero point must stay an integer code, so every zero
    ``z`` in ``0..qmax`` is tried with its own optimal scale, and the error
    ``|w|^2 - <w, d_z>^2 / <d_z, d_z>`` (``d_z = codes - z``) picks one; sums in float64 so
    that ``<d_z, d_z>``, expanded in ``z``, stays exact. A block whose codes carry no signal
    (all equal to the zero, or fitting only a non-positive scale) gets scale 0: callers keep
    their previous parameters there.
    """
    w, q = blocks.double(), codes.double()
    if scheme.symmetric:
        d = q - scheme.mid
        num, den = (w * d).sum(dim=1), d.square().sum(dim=1)
        ok = (num > 0) & (den > 0)
        return torch.where(ok, num / den.clamp(min=1.0), 0.0).float(), None
    zs = torch.arange(scheme.qmax + 1, dtype=torch.float64, device=blocks.device)
    n = float(blocks.shape[1])
    sum_w, sum_wq = w.sum(dim=1, keepdim=True), (w * q).sum(dim=1, keepdim=True)
    sum_q, sum_qq = q.sum(dim=1, keepdim=True), q.square().sum(dim=1, keepdim=True)
    wd = sum_wq - zs * sum_w  # <w, codes - z> for every z: (blocks, qmax + 1)
    dd = sum_qq - 2 * zs * sum_q + n * zs.square()  # <codes - z, codes - z>
    ok = (wd > 0) & (dd > 0)
    gain = torch.where(ok, wd.square() / dd.clamp(min=1.0), -1.0)  # error = |w|^2 - gain
    best = gain.argmax(dim=1, keepdim=True)
    scale = torch.where(ok.gather(1, best), wd.gather(1, best) / dd.gather(1, best), 0.0)
    return scale.squeeze(1).float(), best.squeeze(1).to(torch.uint8)


def refine_qparams(
    blocks: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QScheme,
    steps: int,
    error: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lower each block's squared error from the starting ``scale``/``zero`` (1-D, one per
    row of ``blocks``) by up to ``steps`` alternations of rounding to nearest and
    :func:`least_squares_qparams` (scale rounded up to ``scale_dtype``, as stored).

    A block keeps a step only when it lowers its error, so no block ends worse than it
    started; blocks stop at a fixed point. ``error``: the blocks' current errors, if known.
    """
    if error is None:
        error = _block_error(blocks, scale, zero, scheme, None)
    codes = quantize_blocks(blocks, scale, zero, scheme)
    for _ in range(steps):
        new_scale, new_zero = least_squares_qparams(blocks, codes, scheme)
        fitted = new_scale > 0
        new_scale = round_scale_up(torch.where(fitted, new_scale, scale), scheme.scale_dtype)
        new_codes = quantize_blocks(blocks, new_scale, new_zero, scheme)
        new_error = (dequantize_blocks(new_codes, new_scale, new_zero, scheme) - blocks).square()
        new_error = new_error.sum(dim=1)
        better = fitted & (new_error < error)
        if not bool(better.any()):
            break
        error = torch.where(better, new_error, error)
        scale = torch.where(better, new_scale, scale)
        if zero is not None and new_zero is not None:
            zero = torch.where(better, new_zero, zero)
        codes = torch.where(better.unsqueeze(1), new_codes, codes)
    return scale, zero


def mse_clip(
    w: torch.Tensor,
    scheme: QScheme,
    grid: int = 100,
    min_ratio: float = 0.5,
    gram: torch.Tensor | None = None,
    refine: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point per block of ``w`` minimizing ``sum((w - dequant(quant(w)))**2)``
    over ``grid`` shrink ratios evenly spaced from 1.0 down to ``min_ratio``, then up to
    ``refine`` least-squares steps (:func:`refine_qparams`; never raises a block's error).

    With ``gram`` (``(column blocks, size, size)`` for a 2-D ``w``: block ``j`` of every row
    reads columns ``j * size .. (j + 1) * size - 1``, ``gram[j]`` is ``X^T X`` of those input
    columns; one ``(1, in, in)`` matrix for per-row scales) the error minimized is the block's
    output error ``d^T gram[j] d`` instead (grid only: ``refine`` must be 0). Without it,
    ``refine > 0`` also tries ``FINE_RATIOS`` ratios on a finer grid around each block's best.

    Returns the same shapes and dtypes as :func:`compactml.quantize.affine.choose_qparams`.
    """
    bad_refine = isinstance(refine, bool) or not isinstance(refine, int) or refine < 0
    if not isinstance(grid, int) or grid < 1 or not 0.0 < min_ratio <= 1.0 or bad_refine:
        raise CompactMLError(
            f"clip search needs grid >= 1, 0 < min_ratio <= 1 and refine >= 0, got "
            f"grid={grid!r}, min_ratio={min_ratio!r}, refine={refine!r}"
        )
    blocks = to_blocks(w.detach(), scheme.granularity).float()
    shape = param_shape(tuple(w.shape), scheme.granularity)
    if gram is not None:
        if refine:
            raise CompactMLError("refine works on the weight's own error; pass refine=0 with gram")
        checked = _check_gram(gram, w, scheme)
        scale, zero, _, _ = _grid_search(blocks, scheme, grid, min_ratio, checked)
        return scale.reshape(shape), (zero.reshape(shape) if zero is not None else None)
    scales, zeros = [], []
    for chunk in blocks.split(max(1, CHUNK // blocks.shape[1])):
        fine = FINE_RATIOS if refine else 0
        scale, zero, err, _ = _grid_search(chunk, scheme, grid, min_ratio, None, fine)
        if refine:
            scale, zero = refine_qparams(chunk, scale, zero, scheme, refine, err)
        scales.append(scale)
        zeros.append(zero)
    scale = torch.cat(scales).reshape(shape)
    return scale, (torch.cat(zeros).reshape(shape) if not scheme.symmetric else None)


def clipped_qparams(
    w: torch.Tensor, scheme: QScheme, clip: str = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of ``w`` by plain min/max (``clip="none"``) or :func:`mse_clip`
    (``clip="mse"``: ``MSE_GRID`` ratios, a finer look around the best, then ``MSE_REFINE``
    least-squares steps)."""
    if clip == "mse":
        return mse_clip(w, scheme, MSE_GRID, MSE_MIN_RATIO, refine=MSE_REFINE)
    if clip == "none":
        return choose_qparams(w, scheme)
    raise CompactMLError(f"clip={clip!r} is not supported; use one of {', '.join(CLIP_METHODS)}")
