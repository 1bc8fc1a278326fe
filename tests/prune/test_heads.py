"""Heads: whole attention heads found from the model's own reshapes, removed with their
head-count attributes; minilm heads and FFN neurons, saved and reloaded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compactml
from compactml.config import history
from compactml.examples import minilm
from compactml.prune.graph import Graph
from compactml.prune.structured import Channels, Heads
from compactml.task import Task


class Attention(nn.Module):
    """Multi-head self-attention; ``eager`` spells the product out and reshapes with the
    head-count attribute (so it must be updated), else scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int, eager: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.all_head_size = heads, width // heads, width
        self.eager = eager
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        heads = self.num_heads if self.eager else -1
        q, k, v = (
            p(x).view(b, s, heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        if self.eager:
            out = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(b, s, self.all_head_size))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, eager: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, eager)
        self.fc1, self.act, self.fc2 = (
            nn.Linear(width, 2 * width),
            nn.GELU(),
            nn.Linear(2 * width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, eager: bool, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.blocks = nn.Sequential(*(Block(width, heads, eager) for _ in range(2)))
        self.head = nn.Linear(width, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(ids)).mean(dim=1))


def tiny(eager: bool) -> tuple[nn.Module, Task]:
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    return TinyTransformer(eager).eval(), Task(example=ids)


@pytest.mark.parametrize("eager", [True, False])
def test_heads_are_found_and_removed_with_their_attributes(eager):
    model, task = tiny(eager)
    graph = Graph.build(model, task.example_input())
    heads = graph.groups("heads")
    assert [g.size for g in heads] == [4, 4]
    assert [m.label for m in heads[0].members] == [
        "blocks.0.attn.q.out", "blocks.0.attn.k.out", "blocks.0.attn.v.out", "blocks.0.attn.o.in"
    ]  # fmt: skip
    pruned = Heads(ratio=0.5).apply(model, task)
    attn = pruned.blocks[1].attn
    assert (attn.num_heads, attn.head_dim, attn.all_head_size) == (2, 4, 8)  # head_dim == 4 kept
    assert attn.q.out_features == attn.v.out_features == attn.o.in_features == 8
    assert pruned.blocks[1].fc1.out_features == 32  # Heads leaves the MLP alone
    assert pruned(task.example_input()).shape == (3, 5)
    assert model.blocks[1].attn.num_heads == 4  # input untouched


@pytest.mark.parametrize("eager", [True, False])
def test_removing_a_silent_head_leaves_the_outputs_unchanged(eager):
    model, task = tiny(eager)
    ids = task.example_input()
    with torch.no_grad():
        model.blocks[0].attn.o.weight[:, 8:12] = 0.0  # head 2 contributes nothing
        before = model(ids)
    graph = Graph.build(model, ids)
    graph.groups("heads")[0].remove([2])
    with torch.no_grad():
        torch.testing.assert_close(graph.model(ids), before, rtol=1e-5, atol=1e-6)
    assert graph.model.blocks[0].attn.num_heads == 3
    assert graph.head_changes == [
        "blocks.0.attn.num_heads: 4 -> 3", "blocks.0.attn.all_head_size: 16 -> 12"
    ]  # fmt: skip


def test_channels_leaves_heads_to_heads():
    model, task = tiny(eager=False)
    pruned = Channels(ratio=0.5).apply(model, task)
    assert pruned.blocks[0].fc1.out_features == 16 and pruned.blocks[0].attn.q.out_features == 16
    skipped = history(pruned)[-1]["skipped"]
    assert skipped["blocks.0.attn.q.out"] == "attention heads: remove them with Heads"
    assert pruned(task.example_input()).shape == (3, 5)


@pytest.fixture(name="minilm_pair", scope="module")
def minilm_pair_fixture():
    return minilm.load(limit=16, progress=False)


@pytest.mark.slow
def test_minilm_heads_and_ffn_neurons_save_and_reload(minilm_pair, tmp_path):
    model, task = minilm_pair
    x = task.example_input()
    heads = Heads(ratio=0.25).apply(model, task)
    for layer in heads.encoder.encoder.layer:
        attention = layer.attention.self
        assert (attention.num_attention_heads, attention.all_head_size) == (9, 288)
        assert attention.query.out_features == layer.attention.output.dense.in_features == 288
    with torch.no_grad():
        fidelity = float(F.cosine_similarity(heads(**x), model(**x)).mean())
    assert fidelity > 0.8  # measured 0.957 with l1 and no fine-tuning
    both = Channels(ratio=0.5).apply(heads, task)
    layer = both.encoder.encoder.layer[0]
    assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 768
    assert layer.output.dense.out_features == 384  # the residual stream is the output: kept
    assert both.encoder.config.intermediate_size == 768
    assert model.encoder.config.intermediate_size == 1536  # input untouched
    assert history(both)[-1]["config"] == {"intermediate_size": [1536, 768]}
    loaded = compactml.load(compactml.save(both, tmp_path / "minilm.cml"))
    assert loaded.encoder.encoder.layer[3].attention.self.num_attention_heads == 9
    with torch.no_grad():
        assert torch.equal(loaded(**x), both(**x))


def test_heads_on_a_model_without_attention_is_a_clear_error():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(compactml.CompactMLError, match="no attention heads in Sequential"):
        Heads(ratio=0.5).apply(model, Task(example=torch.randn(2, 8)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
