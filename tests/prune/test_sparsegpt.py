"""SparseGPT and Wanda as pure functions on tensors."""

from __future__ import annotations

import pytest
import torch

from compactml.errors import CompactMLError
from compactml.prune.sparsegpt import sparsegpt_prune, wanda_prune


def _layer(out: int = 32, inp: int = 64, tokens: int = 512, seed: int = 0):
    """A weight and correlated calibration inputs with uneven feature scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=gen) / inp**0.5
    scales = torch.rand(inp, generator=gen) * 3 + 0.1
    x = (
        torch.randn(tokens, inp, generator=gen) @ mix
        + 0.3 * torch.randn(tokens, inp, generator=gen)
    ) * scales
    w = torch.randn(out, inp, generator=gen)
    return w, x, 2 * x.T @ x / tokens


def _error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.T - x @ q.T) ** 2).sum() / (x @ w.T).pow(2).sum())


def test_wanda_removes_the_lowest_scores_of_each_row():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    norm = torch.tensor([1.0, 1.0, 0.1, 10.0])
    q, keep = wanda_prune(w, norm, sparsity=0.5)
    # scores row 0: 1, 2, 0.3, 5 -> drop cols 2 and 0; row 1: 4, 1, 0.1, 20 -> drop 2 and 1
    assert keep.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert torch.equal(q, torch.where(keep, w, torch.zeros(())))


def test_wanda_n_m_keeps_n_in_every_m():
    w, x, _ = _layer()
    q, keep = wanda_prune(w, x.norm(dim=0), n=2, m=4)
    assert torch.equal(keep.reshape(32, 16, 4).sum(-1), torch.full((32, 16), 2))
    assert torch.equal(q == 0, ~keep)


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    w, _, _ = _layer()
    q, keep = sparsegpt_prune(w, torch.eye(64), sparsity=0.5, block_size=64)
    threshold = w.abs().flatten().sort().values[w.numel() // 2 - 1]
    assert torch.equal(keep, w.abs() > threshold)
    assert torch.allclose(q, torch.where(keep, w, torch.zeros(())), atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs(kwargs):
    w, x, h = _layer()
    q, keep = sparsegpt_prune(w, h, block_size=16, **kwargs)
    wq, _ = wanda_prune(w, x.norm(dim=0), **kwargs)
    magnitude, _ = wanda_prune(w, torch.ones(64), **kwargs)
    assert not torch.isnan(q).any() and torch.equal(q == 0, ~keep)
    assert float((~keep).float().mean()) == pytest.approx(0.5)
    assert _error(w, q, x) < 0.8 * _error(w, wq, x)  # about 0.7x on these layers
    assert _error(w, wq, x) < 0.7 * _error(w, magnitude, x)  # about 0.4-0.6x


def test_sparsegpt_n_m_pattern_and_dead_inputs():
    w, x, h = _layer()
    h[5, :] = h[:, 5] = 0  # feature 5 never active
    q, keep = sparsegpt_prune(w, h, n=2, m=4, block_size=32)
    assert not keep[:, 5].any() and (q[:, 5] == 0).all()
    assert (keep.reshape(32, 16, 4).sum(-1) <= 2).all()
    assert not torch.isnan(q).any()


@pytest.mark.parametrize(
    "kwargs",
    [{"sparsity": 1.0}, {"n": 5, "m": 4}, {"sparsity": 0.5, "n": 2, "m": 4}, {"n": 2, "m": 3}],
)
def test_bad_arguments_are_refused(kwargs):
    w, x, h = _layer()
    with pytest.raises(CompactMLError):
        sparsegpt_prune(w, h, **kwargs)
    with pytest.raises(CompactMLError):
        wanda_prune(w, x.norm(dim=0), **kwargs)


def test_inputs_are_not_modified():
    w, x, h = _layer()
    w0, h0 = w.clone(), h.clone()
    sparsegpt_prune(w, h, sparsity=0.6)
    wanda_prune(w, x.norm(dim=0), sparsity=0.6)
    assert torch.equal(w, w0) and torch.equal(h, h0)
