"""Latency measurement: fields, thread pinning, and restoring the model and torch."""

import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.profile.latency import measure_latency, percentile


def test_latency_fields_are_positive_ordered_and_threads_recorded():
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5)).train()
    before = torch.get_num_threads()
    latency = measure_latency(model, torch.randn(3, 16), repeats=7, warmup=2, threads=1)
    assert 0 < latency.p10_ms <= latency.median_ms <= latency.p90_ms
    assert (latency.repeats, latency.warmup, latency.threads) == (7, 2, 1)
    assert latency.batch_size == 3 and latency.runtime == "pytorch-eager"
    assert torch.get_num_threads() == before
    assert model.training and model[1].training


def test_measures_in_eval_mode_and_restores_each_modules_own_flag():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    model[0].eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append([x.training for x in m.modules()]))
    measure_latency(model, torch.randn(1, 2), repeats=2, warmup=1)
    assert seen == [[False, False, False]] * 3
    assert [m.training for m in model.modules()] == [True, False, True]


def test_percentile_interpolates():
    assert percentile([4.0, 1.0, 3.0, 2.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 10) == pytest.approx(1.0)


def test_bad_repeats_are_a_user_error():
    with pytest.raises(CompactMLError, match="repeats"):
        measure_latency(nn.Linear(2, 2), torch.randn(1, 2), repeats=0)
