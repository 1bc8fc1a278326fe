"""Fixtures for the profile tests: a tiny model whose MACs can be counted by hand."""

import pytest
import torch
from torch import nn


class ConvLinear(nn.Module):
    """Conv2d(3->8, 3x3, padding 1) on 16x16, then Linear(8*16*16 -> 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def conv_linear() -> nn.Module:
    """A fresh ConvLinear in eval mode."""
    torch.manual_seed(0)
    return ConvLinear().eval()


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: neither torch.export nor torch.fx can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:
            return self.fc(x)
        return self.fc(-x)


@pytest.fixture
def untraceable() -> nn.Module:
    """A model neither torch.export nor torch.fx can trace (data-dependent control flow)."""
    return DataDependent()
