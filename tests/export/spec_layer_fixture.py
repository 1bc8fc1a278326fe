"""A small self-describing layer for the SpecLayer test, imported by module name.

It is not a test module: ``test_artifact_modules.py`` puts this folder on ``sys.path`` and
registers ``SpecLayer("spec_layer_fixture:MaskedLinear")`` in ``MODULE_TYPES``.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskedLinear(nn.Module):
    """A linear layer whose weight is multiplied by a stored 0/1 mask, then scaled."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * x @ (weight * mask).T``."""
        return self.scale * (x @ (self.weight * self.mask).T)

    def compactml_spec(self) -> dict:
        """The constructor arguments, as JSON."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "scale": self.scale,
        }

    @classmethod
    def from_compactml_spec(cls, args: dict) -> MaskedLinear:
        """A new layer from ``compactml_spec()``'s output (weights are loaded afterwards)."""
        return cls(int(args["in_features"]), int(args["out_features"]), float(args["scale"]))
