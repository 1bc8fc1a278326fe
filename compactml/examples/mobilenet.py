"""A MobileNetV2-shaped network (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and
Linear Bottlenecks").

torchvision is not a dependency, so the architecture is written out here: a 3x3 stem, then
inverted residual blocks (a 1x1 expansion conv, a 3x3 depthwise conv, a 1x1 linear projection,
each followed by BatchNorm, ReLU6 after the first two), with a residual add when the block keeps
its stride and width; a final 1x1 conv to 1280 channels, global average pooling, dropout and a
linear classifier. Every ReLU6 is its own ``nn.ReLU6`` module. ``width_mult`` scales every
width (rounded to a multiple of 8, as in the paper) so tests can use a tiny network. The
weights are random: the model is for speed, export and structural tests, not accuracy.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from compactml.examples.resnet import randomize_batchnorm

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to the nearest multiple of ``divisor``, never below 90% of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (no bias), BatchNorm and, when ``act``, ReLU6, as a named Sequential."""
    layers = OrderedDict(
        conv=nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        bn=nn.BatchNorm2d(cout),
    )
    if act:
        layers["relu"] = nn.ReLU6()
    return nn.Sequential(layers)


class InvertedResidual(nn.Module):
    """Expand (1x1), filter (3x3 depthwise), project (1x1, linear); ``x + block(x)`` when the
    stride is 1 and the width is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = round(cin * expansion)
        self.use_residual = stride == 1 and cin == cout
        layers = OrderedDict()
        if expansion != 1:
            layers["expand"] = conv_bn(cin, hidden, 1)
        layers["depthwise"] = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers["project"] = conv_bn(hidden, cout, 1, act=False)
        self.block = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output: ``cout`` channels, spatial size divided by the stride."""
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Stem, 17 inverted residual blocks, a 1x1 conv to ``1280 * max(1, width_mult)``
    channels, pooling and a classifier.

    Input ``(batch, 3, H, W)`` float images; output ``(batch, num_classes)`` logits.
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult)
        last = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
        features = [conv_bn(3, cin, 3, stride=2)]
        for expansion, channels, repeats, stride in SETTINGS:
            cout = make_divisible(channels * width_mult)
            for i in range(repeats):
                features.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        features.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for images ``(batch, 3, H, W)``."""
        return self.classifier(self.flatten(self.pool(self.features(x))))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, seed: int = 0) -> MobileNetV2:
    """A MobileNetV2-shaped network with random weights (seeded) and randomized BatchNorm
    statistics, in eval mode. ``width_mult`` scales every width (1.0 in the paper)."""
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes, width_mult)
    return randomize_batchnorm(model, seed).eval()
