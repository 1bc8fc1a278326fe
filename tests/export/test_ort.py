"""ONNX Runtime helpers: explicit sessions, feeds by input name, latency, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.export import ort as cort
from compactml.export.onnx import export


class Pair(nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids.float() * attention_mask.float() + 1.0


@pytest.fixture
def pair_path(tmp_path):
    example = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4)}
    return export(Pair(), tmp_path / "pair.onnx", example)


def test_session_settings_are_explicit(pair_path):
    sess = cort.session(pair_path, threads=3)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    settings = cort.session_settings(sess)
    assert settings["threads"] == 3
    assert settings["graph_optimization"] == "ORT_ENABLE_ALL"
    assert cort.session_settings(cort.session(pair_path))["threads"] == cort.DEFAULT_THREADS


def test_run_maps_dicts_by_name_and_ignores_unused_keys(pair_path):
    sess = cort.session(pair_path)
    ids = torch.arange(6).reshape(2, 3)
    inputs = {"attention_mask": torch.ones(2, 3), "input_ids": ids, "extra": torch.zeros(1)}
    (out,) = cort.run(sess, {k: inputs[k] for k in ("input_ids", "attention_mask")})
    assert np.array_equal(out, ids.numpy() + 1.0)
    assert np.array_equal(cort.feeds(sess, inputs)["input_ids"], ids.numpy())


def test_missing_input_and_bad_shape_are_user_errors(pair_path):
    sess = cort.session(pair_path)
    with pytest.raises(CompactMLError, match="needs input"):
        cort.run(sess, {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(CompactMLError, match="ONNX Runtime failed"):
        cort.run(sess, {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": 1.0})


def test_session_errors(tmp_path, pair_path):
    with pytest.raises(CompactMLError, match="does not exist"):
        cort.session(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(CompactMLError, match="cannot load"):
        cort.session(broken)
    with pytest.raises(CompactMLError, match="threads"):
        cort.session(pair_path, threads=0)


def test_latency_reports_percentiles(pair_path):
    sess = cort.session(pair_path, threads=1)
    inputs = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    result = cort.latency(sess, inputs, repeats=7, warmup=1)
    assert result["repeats"] == 7 and result["threads"] == 1
    assert 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]
    with pytest.raises(CompactMLError, match="repeats"):
        cort.latency(sess, inputs, repeats=0)
