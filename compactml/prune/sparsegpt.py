"""SparseGPT and Wanda: pruning a linear layer with calibration statistics, as pure functions.

Both read what the layer's inputs look like. Write the layer as ``Y = X W^T`` with ``X`` of
shape ``[tokens, in]`` and ``W`` of shape ``[out, in]``.

- **Wanda** (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
  Models") scores each weight by ``|W_ij| * ||X_j||_2`` (the norm of input feature ``j`` over
  the calibration tokens) and removes the lowest scores *within each output row* (or, for N:M,
  within each group of ``m`` consecutive inputs of a row). No weight update.
- **SparseGPT** (Frantar and Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot") treats pruning as a layer-wise reconstruction problem with
  the Hessian ``H = 2 X^T X / n``: it walks the columns left to right, chooses the mask of each
  block of ``block_size`` columns by ``w^2 / [H^-1]_jj^2`` (the error a removal causes), and
  after zeroing a column spreads its error over the columns not yet visited with the rows of
  the Cholesky factor of ``H^-1``, exactly as GPTQ does for rounding.

``n`` and ``m`` follow :class:`~compactml.prune.nm.NM`: ``n`` weights are *kept* in every ``m``
consecutive inputs of a row. Both functions return ``(weight, keep_mask)`` and never modify
their arguments; the weight comes back in the input's dtype, zero where the mask is False.
"""

from __future__ import annotations

import torch

from compactml.errors import CompactMLError
from compactml.quantize.gptq import inverse_cholesky


def _check(weight: torch.Tensor, sparsity: float | None, n: int | None, m: int | None) -> None:
    if weight.dim() != 2:
        raise CompactMLError(f"expected a 2-D linear weight, got shape {tuple(weight.shape)}")
    if (sparsity is None) == (n is None or m is None):
        raise CompactMLError("give either sparsity= or both n= and m= (N:M), not both")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise CompactMLError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if n is not None and m is not None:
        if not 1 <= n <= m:
            raise CompactMLError(f"N:M needs 1 <= n <= m, got n={n}, m={m}")
        if weight.shape[1] % m:
            raise CompactMLError(
                f"the layer's {weight.shape[1]} inputs are not divisible by m={m}; exclude it"
            )


def _lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask removing the ``count`` lowest scores of every row (ties: lower index first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
        keep.scatter_(1, order, False)
    return keep


def _nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive entries of a row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def wanda_prune(
    weight: torch.Tensor,
    input_norm: torch.Tensor,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda: remove the weights of lowest ``|W_ij| * ||X_j||`` per output row.

    Args:
        weight: ``[out, in]``.
        input_norm: ``[in]``, the L2 norm of each input feature over the calibration tokens.
        sparsity: share of each row removed (``round(sparsity * in)`` weights), or
        n, m: keep ``n`` of every ``m`` consecutive weights of a row.
    """
    _check(weight, sparsity, n, m)
    if input_norm.shape != (weight.shape[1],):
        raise CompactMLError(
            f"input_norm has shape {tuple(input_norm.shape)}, expected ({weight.shape[1]},)"
        )
    scores = weight.detach().float().abs() * input_norm.float().reshape(1, -1)
    if sparsity is not None:
        keep = _lowest_per_row(scores, round(sparsity * weight.shape[1]))
    else:
        keep = _nm_keep(scores, n, m)
    return torch.where(keep, weight.detach(), torch.zeros((), dtype=weight.dtype)), keep


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune ``weight`` to ``sparsity`` (or N:M) and update the remaining weights so
    that ``X W^T`` changes as little as possible for inputs with Hessian ``hessian``.

    Args:
        weight: ``[out, in]``.
        hessian: ``[in, in]``, ``2 X^T X / tokens`` of the layer's calibration inputs.
        sparsity: share of the weights removed; the mask is chosen per block of ``block_size``
            columns over all rows (the paper's adaptive mask selection), or
        n, m: keep ``n`` of every ``m`` consecutive weights of a row (``block_size`` must be a
            multiple of ``m``).
        block_size: columns processed together (lazy batch updates).
        damp: dampening, a fraction of the mean diagonal of ``H`` added to it.

    Inputs whose Hessian diagonal is zero (never active) are pruned outright. Raises
    ``torch.linalg.LinAlgError`` when the dampened Hessian is not positive definite (the
    caller may retry with more dampening).
    """
    _check(weight, sparsity, n, m)
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise CompactMLError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if m is not None and block_size % m:
        raise CompactMLError(f"block_size={block_size} must be a multiple of m={m}")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_cholesky(h, damp).double()  # GPTQ's factor: the same U^T U = H^-1
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w1, h1 = w[:, start:end].clone(), hinv[start:end, start:end]
        err = torch.zeros_like(w1)
        diag = h1.diagonal()
        if sparsity is not None:
            cost = w1**2 / diag.reshape(1, -1) ** 2
            k = round(sparsity * cost.numel())
            drop = torch.zeros_like(cost, dtype=torch.bool).reshape(-1)
            if k > 0:
                drop[torch.sort(cost.reshape(-1), stable=True).indices[:k]] = True
            keep1 = ~drop.reshape(cost.shape)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(end - start):
            if m is not None and i % m == 0:
                cost = w1[:, i : i + m] ** 2 / diag[i : i + m].reshape(1, -1) ** 2
                keep1[:, i : i + m] = _nm_keep(cost, n, m)
            column = w1[:, i]
            pruned = torch.where(keep1[:, i], column, torch.zeros((), dtype=column.dtype))
            e = (column - pruned) / h1[i, i]
            w1[:, i:] -= e.reshape(-1, 1) @ h1[i, i:].reshape(1, -1)
            w1[:, i] = pruned
            err[:, i] = e
        w[:, start:end] = w1
        keep[:, start:end] = keep1
        w[:, end:] -= err @ hinv[start:end, end:]
    keep &= ~dead.reshape(1, -1)
    w = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
    return w.to(weight.dtype), keep
