"""A ResNet-18-shaped network (He et al. 2016, "Deep Residual Learning for Image Recognition").

torchvision is not a dependency, so the architecture is written out here: BasicBlock (two 3x3
conv-BN pairs and a residual add, with a 1x1 conv-BN shortcut when the shape changes) stacked
2-2-2-2 after a 7x7 stem and a max pool, then global average pooling and a linear classifier.
Every ReLU is its own ``nn.ReLU`` module (no functional relu, no module reused twice), so
hooks see each activation. ``width`` scales every stage (64 is the real ResNet-18) so tests can
use a tiny network. The weights are random: the model is for speed and export tests, not
accuracy.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output (same batch, ``cout`` channels, spatial size divided by stride)."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """Stem, four stages of BasicBlocks (``layers`` blocks each), pooling and a classifier.

    Input ``(batch, 3, H, W)`` float images; output ``(batch, num_classes)`` logits.
    """

    def __init__(self, layers: tuple[int, ...], num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], width
        for i, blocks in enumerate(layers):
            cout, stride = width * 2**i, 1 if i == 0 else 2
            stage = [BasicBlock(cin, cout, stride)]
            stage += [BasicBlock(cout, cout) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for images ``(batch, 3, H, W)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d non-trivial running statistics and affine parameters (in place,
    deterministic for ``seed``) so folding them is a real test; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def resnet18(num_classes: int = 1000, width: int = 64, seed: int = 0) -> ResNet:
    """A ResNet-18-shaped network (blocks 2-2-2-2) with random weights (seeded) and randomized
    BatchNorm statistics, in eval mode. ``width`` is the stem's channel count (64 in the paper)."""
    torch.manual_seed(seed)
    model = ResNet((2, 2, 2, 2), num_classes, width)
    return randomize_batchnorm(model, seed).eval()
