"""Activation observers: running statistics, histogram growth, and each range rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compactml.errors import CompactMLError
from compactml.quantize.act import act_qparams
from compactml.quantize.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    kl_threshold_bin,
    make_observer,
)


def _with_outlier(seed: int = 0, relu: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20000, generator=g)
    if relu:
        x = x.clamp(min=0)
    x[0] = 40.0  # one value far outside the bulk
    return x


def test_minmax_tracks_extremes_over_batches_and_gives_act_qparams():
    obs = MinMaxObserver()
    obs.observe(torch.tensor([0.5, 2.0]))
    obs.observe(torch.tensor([[-1.0, 0.0]]))
    assert obs.clip_range() == (-1.0, 2.0)
    assert obs.qparams() == act_qparams(-1.0, 2.0)


def test_histogram_growth_keeps_every_count_in_the_right_bin():
    g = torch.Generator().manual_seed(0)
    first, second = torch.rand(5000, generator=g), torch.rand(5000, generator=g) * 5 - 2
    obs = HistogramObserver(bins=64)
    obs.observe(first)
    obs.observe(second)
    assert obs.counts.sum() == 10000
    assert obs.lo <= float(second.min()) and obs.lo + 64 * obs.width >= float(second.max())
    expected, _ = np.histogram(torch.cat([first, second]).numpy(), bins=obs.edges)
    assert np.abs(obs.counts - expected).max() <= 2  # only values on a bin edge may move


def test_percentile_ignores_a_lone_outlier_that_minmax_keeps():
    x = _with_outlier()
    pct = PercentileObserver(99.9)
    pct.observe(x)
    lo, hi = pct.clip_range()
    assert 2.5 < hi < 5.0 and -5.0 < lo < -2.5
    both_abs = PercentileObserver(99.9, tails="abs")
    both_abs.observe(x)
    lo_a, hi_a = both_abs.clip_range()
    assert hi_a == pytest.approx(-lo_a) and 2.5 < hi_a < 5.0


def test_mse_range_clips_outlier_when_steps_are_coarse_and_beats_full_range():
    obs = MSEObserver()
    obs.observe(_with_outlier())
    lo, hi = obs.clip_range(bits=4)  # 15 steps: rounding error dominates, the outlier is cut
    assert hi < 20.0
    assert obs.error(lo, hi, 4, False) < obs.error(obs.min, obs.max, 4, False)
    lo8, hi8 = obs.clip_range(bits=8)  # 255 steps: cutting the outlier costs more than it saves
    assert obs.error(lo8, hi8, 8, False) <= obs.error(obs.min, obs.max, 8, False)


def test_kl_threshold_keeps_a_uniform_histogram_whole_and_cuts_a_long_tail():
    assert kl_threshold_bin(np.ones(512), 128) == 512
    values = np.abs(_with_outlier().numpy())
    counts, _ = np.histogram(values, bins=2048, range=(0.0, values.max()))
    assert 128 <= kl_threshold_bin(counts, 128) < 1024


def test_entropy_range_on_relu_data_sits_between_bulk_and_outlier():
    obs = EntropyObserver()
    obs.observe(_with_outlier(relu=True))
    lo, hi = obs.clip_range()
    assert lo == 0.0
    assert 2.0 < hi < 40.0


def test_observers_reject_bad_input():
    with pytest.raises(CompactMLError, match="unknown observer"):
        make_observer("median")
    with pytest.raises(CompactMLError, match="percentile"):
        PercentileObserver(40.0)
    with pytest.raises(CompactMLError, match="saw no data"):
        MinMaxObserver().qparams()
    with pytest.raises(CompactMLError, match="not finite"):
        HistogramObserver().observe(torch.tensor([1.0, float("nan")]))
