"""Tiny models for the quantization tests, and the artifact table entries for quantized layers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from torch import nn

from compactml.source import load_factory

FACTORY = textwrap.dedent(
    """
    import torch
    from torch import nn


    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
            self.conv3 = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect", groups=2)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            x = torch.relu(self.conv3(x))
            return self.fc(self.pool(x).flatten(1))


    class TokenNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 64, padding_idx=0)
            self.proj = nn.Linear(64, 64)
            self.head = nn.Linear(64, 48)
            self.out = nn.Linear(48, 5)

        def forward(self, ids):
            h = self.embed(ids).mean(1)
            return self.out(torch.relu(self.head(torch.relu(self.proj(h)))))


    def conv():
        torch.manual_seed(0)
        return ConvNet().eval()


    def tokens():
        torch.manual_seed(0)
        return TokenNet().eval()


    def wide():
        torch.manual_seed(0)
        layers = []
        for _ in range(4):
            layers += [nn.Linear(256, 256), nn.ReLU()]
        return nn.Sequential(*layers).eval()
    """
)


@pytest.fixture
def factory(tmp_path: Path):
    """``factory(name)``: a model from the factory file, with its source recorded."""
    path = tmp_path / "qnets.py"
    path.write_text(FACTORY)

    def build(name: str) -> nn.Module:
        return load_factory(f"{path}:{name}")[0]

    return build
