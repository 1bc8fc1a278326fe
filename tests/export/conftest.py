"""Tiny models for the artifact tests, built from factory files written into tmp_path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from compactml.source import load_factory

NET_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Mixer(nn.Module):
        def __init__(self, width, heads):
            super().__init__()
            self.heads = heads
            self.proj = nn.Linear(width, width)
            self.offset = nn.Parameter(torch.zeros(width))

        def forward(self, x):
            b, w = x.shape
            if self.offset is not None:
                x = x + self.offset
            parts = self.proj(x).view(b, self.heads, w // self.heads)
            return parts.softmax(-1).reshape(b, w)


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Linear(4, 8)
            self.mixer = Mixer(8, 4)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            x = self.pool(self.act(self.bn(self.conv(x)))).flatten(1)
            return self.fc2(self.mixer(torch.relu(self.fc1(x))))


    def build():
        torch.manual_seed(0)
        return Net()


    def build_seq():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.1), nn.Linear(5, 2))
    """
)


def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Change every weight so a load that ignores the file would give different outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen))
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.add_(torch.rand(buf.shape, generator=gen))
    return model.eval()


@pytest.fixture(name="perturb")
def perturb_fixture():
    """The ``perturb`` function, for tests that change a model after building it."""
    return perturb


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    """A factory file defining ``build`` (a small CNN) and ``build_seq`` (a Sequential MLP)."""
    path = tmp_path / "net.py"
    path.write_text(NET_SOURCE)
    return path


@pytest.fixture
def net(factory_file: Path) -> nn.Module:
    """The CNN from the factory, with its source recorded and weights changed after building."""
    model, _ = load_factory(f"{factory_file}:build")
    return perturb(model)


@pytest.fixture
def image() -> torch.Tensor:
    """An input batch for ``net``: two 1x8x8 images."""
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
