"""The MobileNetV2-shaped reference network."""

from __future__ import annotations

import torch
from torch import nn

from compactml.examples.mobilenet import InvertedResidual, make_divisible, mobilenet_v2


def test_shape_blocks_and_depthwise_convolutions():
    model = mobilenet_v2(num_classes=7, width_mult=0.25)
    assert not model.training
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    for block in blocks:
        dw = block.block.depthwise.conv
        assert dw.groups == dw.in_channels == dw.out_channels and dw.kernel_size == (3, 3)
        assert isinstance(block.block.depthwise.relu, nn.ReLU6)
        assert not hasattr(block.block.project, "relu")  # linear bottleneck


def test_full_width_matches_the_paper_and_seed_is_deterministic():
    model = mobilenet_v2()
    assert 3.4e6 < sum(p.numel() for p in model.parameters()) < 3.6e6  # 3.5M in the paper
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert sum(b.use_residual for b in blocks) == 10  # stride 1 and same width
    assert make_divisible(32 * 0.35) == 16 and make_divisible(4) == 8
    a, b = mobilenet_v2(10, 0.25, seed=3), mobilenet_v2(10, 0.25, seed=3)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
