"""MSE clipping search: lower weight error than min/max on heavy-tailed weights; the
least-squares refinement never raises a block's error."""

from __future__ import annotations

import pytest
import torch

from compactml.errors import CompactMLError
from compactml.quantize import affine, clip
from compactml.quantize.affine import PerChannel, PerGroup, QScheme, choose_qparams
from compactml.quantize.clip import clipped_qparams, least_squares_qparams, mse_clip


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


# --- least-squares refinement ----------------------------------------------------------------


def block_errors(blocks: torch.Tensor, scale, zero, scheme: QScheme) -> torch.Tensor:
    codes = affine.quantize_blocks(blocks, scale, zero, scheme)
    return (affine.dequantize_blocks(codes, scale, zero, scheme) - blocks).square().sum(dim=1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_least_squares_qparams_beat_every_other_scale_and_zero_for_fixed_codes(symmetric):
    torch.manual_seed(1)
    scheme = QScheme(4, symmetric, PerGroup(16))
    blocks = torch.randn(6, 16)
    codes = affine.quantize_blocks(blocks, *affine.block_qparams(blocks, scheme), scheme)
    scale, zero = least_squares_qparams(blocks, codes, scheme)
    assert scale.shape == (6,) and (scale > 0).all()
    assert zero is None if symmetric else (zero.dtype == torch.uint8 and zero.shape == (6,))

    def fixed_code_error(s, z):  # the codes stay as given: no re-rounding
        return (blocks - (codes - z.reshape(-1, 1).float()) * s.reshape(-1, 1)).square().sum(1)

    best = fixed_code_error(scale, zero if zero is not None else torch.full((6,), scheme.mid))
    for z in [scheme.mid] if symmetric else range(scheme.qmax + 1):
        for s in torch.linspace(0.01, 2.0, 400):
            other = fixed_code_error(torch.full((6,), s.item()), torch.full((6,), z))
            assert (best <= other + 1e-5).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [PerGroup(32), PerChannel(0)], ids=str)
def test_refinement_never_raises_a_blocks_error_and_lowers_the_total(symmetric, granularity):
    torch.manual_seed(2)
    w = torch.cat([torch.randn(32, 128), torch.distributions.StudentT(3.0).sample((32, 128))])
    scheme = QScheme(4, symmetric, granularity)
    blocks = affine.to_blocks(w, granularity)
    grid = mse_clip(w, scheme, grid=10)
    refined = mse_clip(w, scheme, grid=10, refine=4)
    before, after = block_errors(blocks, *grid, scheme), block_errors(blocks, *refined, scheme)
    assert (after <= before).all()
    assert after.sum() < 0.995 * before.sum()
    assert torch.equal(refined[0].half().float(), refined[0])  # scales stored exactly as fp16


def test_refined_round_trip_stays_within_half_a_step_inside_the_range():
    torch.manual_seed(3)
    scheme = QScheme(4, False, PerGroup(32))
    w = torch.randn(16, 64)
    scale, zero = clipped_qparams(w, scheme, "mse")
    codes = affine.quantize(w, scale, zero, scheme)
    assert int(codes.max()) <= scheme.qmax and int(zero.max()) <= scheme.qmax
    step = scale.repeat_interleave(32, dim=1)
    lo = (0 - zero.float()).repeat_interleave(32, dim=1) * step
    hi = (scheme.qmax - zero.float()).repeat_interleave(32, dim=1) * step
    err = (affine.dequantize(codes, scale, zero, scheme) - w).abs()
    inside = (w >= lo) & (w <= hi)
    assert inside.float().mean() > 0.9
    assert (err[inside] <= step[inside] / 2 + 1e-6).all()
    minmax = group_errors(w, *choose_qparams(w, scheme), scheme)
    assert (group_errors(w, scale, zero, scheme) <= minmax).all()


def test_clip_mse_is_the_short_grid_plus_refinement_and_beats_the_long_grid():
    torch.manual_seed(4)
    w = torch.distributions.StudentT(4.0).sample((64, 256))
    scheme = QScheme(4, False, PerGroup(32))
    found = clipped_qparams(w, scheme, "mse")
    expected = mse_clip(w, scheme, clip.MSE_GRID, clip.MSE_MIN_RATIO, refine=clip.MSE_REFINE)
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])
    long_grid = group_errors(w, *mse_clip(w, scheme, grid=100), scheme).sum()
    assert group_errors(w, *found, scheme).sum() < long_grid


@pytest.mark.parametrize("symmetric", [True, False])
def test_chunked_search_matches_one_chunk(monkeypatch, symmetric):
    torch.manual_seed(5)
    w = torch.randn(8, 3, 4, 4)  # a conv weight: 48 weights per row, groups of 16
    scheme = QScheme(3, symmetric, PerGroup(16))
    whole = mse_clip(w, scheme, grid=8, refine=3)
    monkeypatch.setattr(clip, "CHUNK", 40)  # 2 blocks per chunk, the last chunk partial
    chunked = mse_clip(w, scheme, grid=8, refine=3)
    assert chunked[0].shape == (8, 3) and torch.equal(whole[0], chunked[0])
    assert symmetric or torch.equal(whole[1], chunked[1])


def test_refinement_keeps_zero_and_constant_blocks_exact():
    w = torch.zeros(4, 32)
    w[1] = 0.25
    w[2, :16] = -1.0
    for symmetric in (True, False):
        scheme = QScheme(4, symmetric, PerGroup(16))
        scale, zero = mse_clip(w, scheme, grid=5, refine=4)
        back = affine.dequantize(affine.quantize(w, scale, zero, scheme), scale, zero, scheme)
        assert torch.isfinite(scale).all() and (back[0] == 0).all() and (back[3] == 0).all()
        assert torch.allclose(back, w, atol=1e-3)


def test_bad_refine_arguments():
    w = torch.randn(4, 32)
    with pytest.raises(CompactMLError, match="refine >= 0"):
        mse_clip(w, QScheme(4), refine=-1)
    with pytest.raises(CompactMLError, match="refine=0 with gram"):
        mse_clip(w, QScheme(4, True, PerGroup(32)), gram=torch.eye(32)[None], refine=2)
