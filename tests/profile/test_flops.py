"""MAC counting: totals and per-module counts against hand arithmetic."""

import torch
from torch import nn

from compactml.profile.flops import trace_forward

# Conv2d(3->8, 3x3) on a 16x16 output: each of 8*16*16 outputs needs 3*3*3 MACs.
CONV_MACS = 8 * 16 * 16 * (3 * 3 * 3)  # 55,296
# Linear(2048 -> 10): each of 10 outputs needs 2048 MACs.
FC_MACS = (8 * 16 * 16) * 10  # 20,480


def test_macs_match_hand_count_per_sample_and_per_module(conv_linear):
    model = conv_linear
    trace = trace_forward(model, torch.randn(2, 3, 16, 16))
    assert trace.total_macs == 2 * (CONV_MACS + FC_MACS)  # batch of 2
    assert trace.inclusive_macs["conv"] == 2 * CONV_MACS
    assert trace.inclusive_macs["fc"] == 2 * FC_MACS
    assert trace.inclusive_macs[""] == trace.total_macs
    assert trace.output_shapes["conv"] == [2, 8, 16, 16]
    assert trace.output_shapes["fc"] == [2, 10]
    assert trace.output_bytes["fc"] == 2 * 10 * 4


def test_exclusive_macs_subtract_children_and_keep_own_matmuls():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x)  # 5 tokens * 4 * 4 = 80 MACs, in the child
            return q @ q.transpose(-1, -2)  # 5 * 5 * 4 = 100 MACs, in this module itself

    model = nn.Sequential(Attention()).eval()
    trace = trace_forward(model, torch.randn(1, 5, 4))
    own = trace.module_macs
    assert trace.total_macs == 180
    assert own["0.q"] == 80
    assert own["0"] == 100
    assert own[""] == 0


def test_trace_leaves_no_hooks_behind(conv_linear):
    model = conv_linear
    trace_forward(model, torch.randn(1, 3, 16, 16))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_module_list_members_keep_their_own_macs():
    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:  # the ModuleList itself is never called
                x = block(x)
            return x

    trace = trace_forward(Stack().eval(), torch.randn(2, 4))
    assert [trace.module_macs[f"blocks.{i}"] for i in range(3)] == [2 * 16] * 3
    assert trace.module_macs[""] == 0 and trace.module_macs["blocks"] == 0
    assert sum(trace.module_macs.values()) == trace.total_macs == 3 * 2 * 16


def test_fused_cpu_attention_is_counted_as_two_matmuls():
    class Sdpa(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(q, q, q)

    # batch 1, 2 heads, 5 tokens, head size 4: q @ k^T = 2*5*5*4 MACs, scores @ v the same.
    trace = trace_forward(Sdpa().eval(), torch.randn(1, 2, 5, 4))
    assert trace.total_macs == 2 * (2 * 5 * 5 * 4)
