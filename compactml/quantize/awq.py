"""AWQ's scale search as a pure function (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration").

A few input channels carry much larger activations than the rest, and the weights that read
them matter most. AWQ multiplies input channel ``j`` of the weight by ``s_j`` before
round-to-nearest and divides the activation by ``s_j`` (folded into the operation that produces
it), so ``X W^T = (X / s) (W * s)^T`` stays exact in float while the salient weights get a finer
relative grid. The scales are ``s = mean|X_j| ** alpha`` (normalized so their geometric mean of
max and min is 1), with ``alpha`` chosen on a grid in ``[0, 1)`` to minimize the output error of
the quantized layer on calibration inputs; ``alpha = 0`` is plain round-to-nearest, so the
search never does worse than RTN on the data it sees.

Where the scales are folded (a preceding LayerNorm or Linear, or an explicit scale) is the
caller's business; this module only chooses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactml.errors import CompactMLError
from compactml.quantize.affine import QScheme, choose_qparams, fake_quantize


@dataclass(frozen=True)
class AWQScales:
    """The chosen per-input-channel ``scales`` (``[in]``), their exponent ``alpha``, and the
    relative output error of the quantized layer with them (``error``) and without (``rtn``)."""

    scales: torch.Tensor
    alpha: float
    error: float
    rtn: float


def quantized_with_scales(
    weight: torch.Tensor, scales: torch.Tensor, scheme: QScheme
) -> torch.Tensor:
    """``Q(W * s) / s``: the float weight the layer effectively uses with scales ``s``."""
    scaled = weight * scales.reshape(1, -1)
    scale, zero = choose_qparams(scaled, scheme)
    return fake_quantize(scaled, scale, zero, scheme) / scales.reshape(1, -1)


def awq_search(
    weight: torch.Tensor, inputs: torch.Tensor, scheme: QScheme, grid: int = 20
) -> AWQScales:
    """Choose AWQ scales for a linear ``weight`` (``[out, in]``) from calibration ``inputs``
    (``[tokens, in]``) under quantization ``scheme``, trying ``alpha = i / grid`` for
    ``i = 0 .. grid - 1``."""
    if weight.dim() != 2 or inputs.dim() != 2 or inputs.shape[1] != weight.shape[1]:
        raise CompactMLError(
            f"AWQ needs a [out, in] weight and [tokens, in] inputs, got {tuple(weight.shape)} "
            f"and {tuple(inputs.shape)}"
        )
    if not isinstance(grid, int) or grid < 1:
        raise CompactMLError(f"grid must be a positive integer, got {grid!r}")
    w, x = weight.detach().float(), inputs.detach().float()
    reference = x @ w.T
    norm = float(reference.pow(2).sum()) or 1.0
    mean_abs = x.abs().mean(dim=0).clamp(min=1e-4)
    best: AWQScales | None = None
    rtn = 0.0
    for i in range(grid):
        alpha = i / grid
        s = mean_abs**alpha
        s = s / (s.max() * s.min()).sqrt()
        error = float((x @ quantized_with_scales(w, s, scheme).T - reference).pow(2).sum()) / norm
        if i == 0:
            rtn = error
        if best is None or error < best.error:
            best = AWQScales(s, alpha, error, rtn)
    assert best is not None
    return AWQScales(best.scales, best.alpha, best.error, rtn)
