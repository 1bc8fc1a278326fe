"""MSE clipping search: lower weight error than min/max on heavy-tailed weights."""

from __future__ import annotations

import pytest
import torch

from compactml.errors import CompactMLError
from compactml.quantize import affine
from compactml.quantize.affine import PerChannel, PerGroup, QScheme, choose_qparams
from compactml.quantize.clip import clipped_qparams, mse_clip


def group_errors(w: torch.Tensor, scale, zero, scheme: QScheme) -> torch.Tensor:
    back = affine.dequantize(affine.quantize(w, scale, zero, scheme), scale, zero, scheme)
    return affine.to_blocks((w - back).square(), scheme.granularity).sum(dim=1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerGroup(32), PerChannel(0)], ids=str)
def test_mse_clip_beats_min_max_on_heavy_tails(symmetric, granularity):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 256))
    scheme = QScheme(4, symmetric, granularity)
    plain = group_errors(w, *choose_qparams(w, scheme), scheme)
    clipped = group_errors(w, *mse_clip(w, scheme), scheme)
    assert clipped.sum() < 0.97 * plain.sum()
    assert (clipped <= plain).all()  # ratio 1.0 is a candidate: no group gets worse


def test_mse_clip_returns_choose_qparams_shapes_and_dtypes():
    w = torch.randn(8, 64)
    scheme = QScheme(3, False, PerGroup(16))
    scale, zero = mse_clip(w, scheme, grid=10)
    ref_scale, ref_zero = choose_qparams(w, scheme)
    assert scale.shape == ref_scale.shape and zero.shape == ref_zero.shape
    assert zero.dtype == torch.uint8
    assert torch.equal(scale.half().float(), scale)  # still exact in float16


def test_grid_of_one_is_min_max():
    w = torch.randn(8, 64)
    scheme = QScheme(4, True, PerGroup(16))
    assert torch.equal(mse_clip(w, scheme, grid=1)[0], choose_qparams(w, scheme)[0])


def test_bad_clip_arguments():
    w = torch.randn(4, 32)
    with pytest.raises(CompactMLError, match="none, mse"):
        clipped_qparams(w, QScheme(4), "percentile")
    with pytest.raises(CompactMLError, match="min_ratio"):
        mse_clip(w, QScheme(4), min_ratio=0.0)
