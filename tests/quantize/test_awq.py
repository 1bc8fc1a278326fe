"""AWQ's scale search as a pure function."""

from __future__ import annotations

import pytest
import torch

from compactml.errors import CompactMLError
from compactml.quantize.affine import PerGroup, QScheme, choose_qparams, fake_quantize
from compactml.quantize.awq import awq_search, quantized_with_scales

SCHEME = QScheme(bits=3, granularity=PerGroup(32))


def _salient_layer(seed: int = 0):
    """Inputs where a few channels are 30x larger than the rest (as in LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=gen)
    x[:, :4] *= 30
    w = torch.randn(64, 128, generator=gen)
    return w, x


def test_alpha_zero_is_round_to_nearest():
    w, _ = _salient_layer()
    scale, zero = choose_qparams(w, SCHEME)
    ones = torch.ones(128)
    assert torch.allclose(
        quantized_with_scales(w, ones, SCHEME), fake_quantize(w, scale, zero, SCHEME)
    )


def test_scales_protect_salient_channels_and_beat_rtn():
    w, x = _salient_layer()
    found = awq_search(w, x, SCHEME)
    assert found.alpha > 0
    assert found.error < 0.8 * found.rtn
    assert float(found.scales[:4].min()) > float(found.scales[4:].max())
    exact = (x / found.scales) @ (w * found.scales.reshape(1, -1)).T  # folding is exact in float
    assert torch.allclose(exact, x @ w.T, rtol=1e-4, atol=1e-3)


def test_uniform_inputs_need_no_scaling():
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(16, 64, generator=gen), torch.randn(512, 64, generator=gen)
    found = awq_search(w, x, SCHEME)
    assert found.error <= found.rtn


def test_bad_shapes_are_refused():
    with pytest.raises(CompactMLError, match="tokens, in"):
        awq_search(torch.randn(4, 8), torch.randn(10, 9), SCHEME)
