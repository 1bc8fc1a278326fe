"""The affine quantization math: hand-computed values, error bounds, packing, STE."""

from __future__ import annotations

import pytest
import torch

from compactml.errors import CompactMLError
from compactml.quantize import affine
from compactml.quantize.affine import (
    FloatScheme,
    PerChannel,
    PerGroup,
    PerTensor,
    QScheme,
    choose_qparams,
    dequantize,
    fake_quantize,
    pack,
    quantize,
    scheme_from_dict,
    unpack,
)

GRANULARITIES = [PerTensor(), PerChannel(0), PerChannel(1), PerGroup(16), PerGroup(32)]


def expanded_scale(w: torch.Tensor, scale: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """The scale that applies to each element of ``w``."""
    blocks = affine.to_blocks(w, scheme.granularity)
    per_elem = scale.reshape(-1, 1).float().expand_as(blocks)
    return affine.from_blocks(per_elem, tuple(w.shape), scheme.granularity)


def test_symmetric_4bit_hand_computed():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scheme = QScheme(4, True, PerTensor())
    scale, zero = choose_qparams(w, scheme)
    # 2/7 = 0.285714 rounded up to float16: 1171 * 2**-12.
    assert zero is None
    assert scale.item() == 1171 * 2.0**-12
    codes = quantize(w, scale, zero, scheme)
    assert codes.dtype == torch.uint8
    assert codes.tolist() == [[5, 8, 10, 15]]  # round(w / s) + 8
    expected = (torch.tensor([[-3.0, 0.0, 2.0, 7.0]]) * scale).tolist()
    assert dequantize(codes, scale, zero, scheme).tolist() == expected


def test_asymmetric_2bit_hand_computed():
    w = torch.tensor([[-1.0, 0.0, 0.4, 2.0]])
    scheme = QScheme(2, False, PerTensor())
    scale, zero = choose_qparams(w, scheme)
    assert scale.item() == 1.0 and zero.item() == 1  # (2 - -1) / 3, round(1 / 1)
    codes = quantize(w, scale, zero, scheme)
    assert codes.tolist() == [[0, 1, 1, 3]]
    assert dequantize(codes, scale, zero, scheme).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_asymmetric_range_includes_zero_exactly():
    w = torch.tensor([[0.5, 1.0, 1.5], [-3.0, -2.0, -1.0]])
    scheme = QScheme(8, False, PerChannel(0))
    scale, zero = choose_qparams(w, scheme)
    assert zero.tolist() == [0, 255]
    zeros = torch.zeros_like(w)
    assert dequantize(quantize(zeros, scale, zero, scheme), scale, zero, scheme).eq(0).all()


def test_per_channel_and_group_shapes():
    w = torch.randn(6, 64)
    assert choose_qparams(w, QScheme(4, True, PerChannel(0)))[0].shape == (6,)
    assert choose_qparams(w, QScheme(4, True, PerChannel(1)))[0].shape == (64,)
    assert choose_qparams(w, QScheme(4, True, PerGroup(16)))[0].shape == (6, 4)
    conv = torch.randn(8, 4, 2, 2)  # rows of 16 = in_channels * kh * kw
    scale, zero = choose_qparams(conv, QScheme(4, False, PerGroup(16)))
    assert scale.shape == zero.shape == (8, 1)


def test_degenerate_rows_get_a_positive_finite_scale():
    w = torch.zeros(3, 32)
    w[1] = 0.25
    for symmetric in (True, False):
        scheme = QScheme(4, symmetric, PerChannel(0))
        scale, zero = choose_qparams(w, scheme)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        back = dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme)
        assert back[0].eq(0).all() and back[2].eq(0).all()
        assert torch.allclose(back[1], w[1], atol=scale[1].item() / 2)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
def test_round_trip_error_at_most_half_a_step(bits, symmetric, granularity):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(8, 64, generator=gen) * torch.rand(8, 1, generator=gen) * 3
    w[0, :5] = torch.tensor([40.0, -0.01, 0.0, 1e-3, -7.0])  # an outlier and tiny values
    scheme = QScheme(bits, symmetric, granularity)
    scale, zero = choose_qparams(w, scheme)
    back = dequantize(quantize(w, scale, zero, scheme), scale, zero, scheme)
    step = expanded_scale(w, scale, scheme)
    assert ((w - back).abs() <= step / 2 + 1e-6 * step + 1e-12).all()


def test_scale_is_exact_in_its_storage_dtype():
    w = torch.randn(16, 64)
    for dtype in ("float16", "float32"):
        scale, _ = choose_qparams(w, QScheme(4, True, PerGroup(32), scale_dtype=dtype))
        stored = scale.to(affine.SCALE_DTYPES[dtype]).float()
        assert torch.equal(stored, scale)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_inverse(bits):
    gen = torch.Generator().manual_seed(bits)
    for numel in (1, 7, 64, 1001):
        codes = torch.randint(0, 1 << bits, (numel,), generator=gen, dtype=torch.uint8)
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == affine.packed_numel(numel, bits)
        assert torch.equal(unpack(packed, bits, numel), codes)


def test_pack_layout_hand_computed():
    assert pack(torch.tensor([1, 2, 3, 4]), 4).tolist() == [0x21, 0x43]
    assert pack(torch.tensor([1, 2, 3, 0, 1]), 2).tolist() == [1 | 2 << 2 | 3 << 4, 1]
    assert pack(torch.tensor([5, 200]), 8).tolist() == [5, 200]
    assert pack(torch.tensor([5, 6]), 3).numel() == 2  # one 3-bit code per byte
    assert affine.packed_numel(1000, 4) == 500 and affine.packed_numel(1000, 2) == 250


def test_fake_quantize_straight_through_gradient():
    w = torch.tensor([[-3.0, -0.4, 0.1, 0.7, 2.9]], requires_grad=True)
    scheme = QScheme(4, True, PerTensor())
    scale = torch.tensor(0.2)  # codes 0..15 cover [-1.6, 1.4]: -3.0 and 2.9 are clipped
    out = fake_quantize(w, scale, None, scheme)
    expected = dequantize(quantize(w, scale, None, scheme), scale, None, scheme)
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


def test_fake_quantize_passes_gradient_to_scale():
    w = torch.randn(4, 32)
    scale = torch.full((4,), 0.1, requires_grad=True)
    fake_quantize(w, scale, None, QScheme(4, True, PerChannel(0))).square().sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bits_outside_range_is_a_clear_error(bits):
    with pytest.raises(CompactMLError, match="from 2 to 8"):
        QScheme(bits)


def test_group_size_must_divide_the_row():
    with pytest.raises(CompactMLError, match=r"row length 48 .*refuses rather than pads.*\(16\)"):
        choose_qparams(torch.randn(4, 48), QScheme(4, True, PerGroup(32)))
    with pytest.raises(CompactMLError, match="group size 24 is not supported"):
        PerGroup(24)


def test_scheme_dict_round_trip():
    schemes = [
        QScheme(4, True, PerGroup(32)),
        QScheme(8, False, PerChannel(1), "float32"),
        QScheme(3, False, PerTensor()),
        FloatScheme("bfloat16"),
    ]
    for scheme in schemes:
        assert scheme_from_dict(scheme.to_dict()) == scheme
    with pytest.raises(CompactMLError, match="float16, bfloat16"):
        FloatScheme("float8")
