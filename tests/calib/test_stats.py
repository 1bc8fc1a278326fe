"""Input statistics: Hessian and per-channel accumulators."""

from __future__ import annotations

import pytest
import torch

from compactml.calib.stats import ChannelStats, HessianStats
from compactml.errors import CompactMLError


def _inputs(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 5, 8, generator=gen), torch.randn(2, 7, 8, generator=gen) * 3]


def test_hessian_is_twice_the_mean_outer_product_over_all_tokens():
    xs = _inputs()
    stats = HessianStats(8)
    for x in xs:
        stats.add(x)
    tokens = torch.cat([x.reshape(-1, 8) for x in xs])
    assert stats.tokens == 15 + 14
    assert torch.allclose(stats.hessian(), 2 * tokens.T @ tokens / 29, atol=1e-5)
    assert stats.problem() is None


def test_channel_stats_give_norms_mean_abs_and_ranges():
    xs = _inputs(1)
    stats = ChannelStats(8)
    for x in xs:
        stats.add(x)
    tokens = torch.cat([x.reshape(-1, 8) for x in xs])
    assert torch.allclose(stats.norm(), tokens.norm(dim=0), atol=1e-5)
    assert torch.allclose(stats.mean_abs(), tokens.abs().mean(dim=0), atol=1e-6)
    assert torch.equal(stats.min, tokens.amin(dim=0)) and torch.equal(stats.max, tokens.amax(0))


@pytest.mark.parametrize("cls", [HessianStats, ChannelStats])
def test_empty_and_non_finite_statistics_name_the_problem(cls):
    stats = cls(4)
    assert "never received input" in stats.problem()
    stats.add(torch.ones(2, 4))
    assert stats.problem() is None
    bad = torch.ones(2, 4)
    bad[1, 2] = float("nan")
    stats.add(bad)
    assert not stats.finite and "NaN or Inf" in stats.problem()
    inf = cls(4)
    inf.add(torch.tensor([[0.0, float("inf"), 1.0, 2.0]]))
    assert "NaN or Inf" in inf.problem()


def test_an_input_of_the_wrong_width_is_a_clear_error():
    with pytest.raises(CompactMLError, match=r"4 input features received an input of shape"):
        HessianStats(4).add(torch.ones(2, 5))
