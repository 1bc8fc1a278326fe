"""Tiny models with repeated blocks for the calibration tests, handed out as fixtures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactml.task import Task


class Layer(nn.Module):
    """A residual MLP block called as ``layer(x, mask, scale=...)``, returning a tuple."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, *, scale: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        return x + self.fc2(torch.relu(self.fc1(x))) * scale * mask, None


class Stack(nn.Module):
    """Input projection, ``depth`` Layers in a ModuleList, a head; inputs ``(x, mask)``."""

    def __init__(self, width: int = 16, depth: int = 3, features: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.layers = nn.ModuleList(Layer(width) for _ in range(depth))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(2 * depth))  # more children, no params
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        scale = torch.full((1,), 0.5)
        for layer in self.layers:
            h = layer(h, mask, scale=scale)[0]
        return self.head(h)


class MLPBlock(nn.Module):
    """A residual two-layer MLP: ``x + fc2(relu(fc1(x)))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class MLPNet(nn.Module):
    """MLPBlocks in a ModuleList and a head; ``side`` (optional) feeds ``side_fc`` only, a
    layer outside the blocks that sees other data."""

    def __init__(self, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.side_fc = nn.Linear(width, 8)
        self.head = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        out = self.head(x)
        return out if side is None else out + self.side_fc(side)


def stack_task(batches: int = 3, features: int = 8, seed: int = 0) -> Task:
    """Calibration batches ``{"x": (4, 6, features), "mask": (4, 6, 1)}`` with correlated
    features and a few masked positions."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=gen)
    data = []
    for _ in range(batches):
        x = torch.randn(4, 6, features, generator=gen) @ mix
        mask = (torch.rand(4, 6, 1, generator=gen) > 0.2).float()
        data.append({"x": x, "mask": mask})
    return Task(calib=data)


def tiny_llama() -> nn.Module:
    """A 2-layer Llama causal LM (random weights, 32 wide)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert() -> nn.Module:
    """A 2-layer BERT sentence encoder (random weights, 32 wide)."""
    import transformers

    from compactml.examples.hf import SentenceEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return SentenceEncoder(transformers.BertModel(config)).eval()


def token_task(padded: bool, batches: int = 2, seed: int = 0) -> Task:
    """Batches of token ids (vocabulary 64); ``padded`` adds attention masks with padding."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        ids = torch.randint(1, 64, (3, 10), generator=gen)
        batch = {"input_ids": ids}
        if padded:
            mask = torch.ones(3, 10, dtype=torch.long)
            mask[1, 7:] = 0
            mask[2, 4:] = 0
            batch["attention_mask"] = mask
        data.append(batch)
    return Task(calib=data)


@pytest.fixture
def models():
    """The builders above: ``models.Stack``, ``models.stack_task``, ``models.tiny_llama``,
    ``models.tiny_bert``, ``models.token_task``."""
    import types

    return types.SimpleNamespace(
        Stack=Stack,
        stack_task=stack_task,
        tiny_llama=tiny_llama,
        tiny_bert=tiny_bert,
        token_task=token_task,
    )
