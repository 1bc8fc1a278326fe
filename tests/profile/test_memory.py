"""Peak activation memory: tensor lifetimes in the traced graph, checked against hand counts."""

import pytest
import torch
from torch import nn

from compactml.profile import memory as memory_module
from compactml.profile.memory import Step, peak_activation, peak_live_bytes

F32 = 4


class Residual(nn.Module):
    """Three 4->4 convs on 8x8 with the input added back at the end (``skip=False``: no add)."""

    def __init__(self, skip: bool = True) -> None:
        super().__init__()
        self.skip = skip
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.c3(self.c2(self.c1(x)))
        return out + x if self.skip else out


class ViewSkip(nn.Module):
    """The skip is a view of the input: the input must stay alive until the view's last use."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x.view(x.shape)
        return self.c2(self.c1(x)) + skip


def test_liveness_walk_counts_each_tensor_until_its_last_use():
    steps = [
        Step("x", 100, is_input=True),
        Step("a", 10, ("x",)),
        Step("b", 1000, ("a",)),  # x (used again by c) + a + b = 1110
        Step("c", 1, ("x", "b")),  # a is dead: x + b + c = 1101
        Step("output", 0, ("c",)),
    ]
    # Freeing x after its first use would give 1010; never freeing anything would give 1111.
    assert peak_live_bytes(steps) == 1110


def test_view_adds_no_bytes_but_keeps_its_base_alive():
    steps = [
        Step("x", 100, is_input=True),
        Step("v", 100, ("x",), alias_of="x"),  # a view: bytes ignored
        Step("a", 10, ("x",)),
        Step("b", 20, ("a",)),
        Step("c", 1, ("b", "v")),  # x alive through v: 100 + 20 + 1
        Step("output", 0, ("c",)),
    ]
    # At step b: x (kept by v) + a + b = 130 is the peak; counting v's bytes would give 230.
    assert peak_live_bytes(steps) == 130


def test_sequential_peak_is_input_plus_first_activation():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1)).eval()
    x = torch.randn(1, 4, 8, 8)
    # input 4*64*4 = 1024 B, conv1 out 8*64*4 = 2048 B, conv2 out 2*64*4 = 512 B.
    # conv1 step: 1024 + 2048 = 3072; conv2 step (input dead): 2048 + 512 = 2560.
    memory = peak_activation(model, x)
    assert memory.peak_bytes == 4 * 64 * F32 + 8 * 64 * F32
    assert memory.method == "torch.export"
    assert memory.note is None
    assert memory.input_bytes == 1024
    assert memory.activation_bytes == 2048 + 512


def test_residual_skip_keeps_the_input_alive():
    x = torch.randn(1, 4, 8, 8)
    tensor = 4 * 64 * F32  # every tensor here is 1x4x8x8 float32 = 1024 bytes
    # Without the skip only producer + consumer are alive: 2 tensors.
    assert peak_activation(Residual(skip=False).eval(), x).peak_bytes == 2 * tensor
    # With it, x lives to the final add: x + c1 + c2 at the c2 step = 3 tensors.
    assert peak_activation(Residual(skip=True).eval(), x).peak_bytes == 3 * tensor


def test_a_view_of_the_input_extends_the_input_lifetime():
    x = torch.randn(1, 4, 8, 8)
    # x (kept alive by its view) + c1 + c2 at the c2 step; the view itself is free.
    assert peak_activation(ViewSkip().eval(), x).peak_bytes == 3 * 4 * 64 * F32


def test_in_place_relu_adds_no_bytes():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True)).eval()
    x = torch.randn(1, 4, 8, 8)
    assert peak_activation(model, x).peak_bytes == 2 * 4 * 64 * F32  # input + conv out


def test_untraceable_model_gives_none_with_a_reason(untraceable):
    memory = peak_activation(untraceable.eval(), torch.randn(2, 4))
    assert memory.peak_bytes is None
    assert "torch.export" in memory.note and "torch.fx" in memory.note


def test_fx_fallback_gives_the_same_hand_counts(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("export unavailable")

    monkeypatch.setattr(memory_module, "_export_steps", refuse)
    x = torch.randn(1, 4, 8, 8)
    tensor = 4 * 64 * F32
    memory = peak_activation(Residual(skip=True).eval(), x)
    assert memory.method == "torch.fx"
    assert "torch.export failed (RuntimeError: export unavailable)" in memory.note
    assert memory.peak_bytes == 3 * tensor
    assert peak_activation(ViewSkip().eval(), x).peak_bytes == 3 * tensor
    relu = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True)).eval()
    assert peak_activation(relu, x).peak_bytes == 2 * tensor


class Add(nn.Module):
    """Two inputs added: peak = both inputs + the sum."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Sorted(nn.Module):
    """``torch.sort`` gives one node with a tuple output (float values + int64 indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = torch.sort(x)
        return values + indices


@pytest.mark.parametrize("fx_only", [False, True])
def test_tuple_and_dict_inputs_and_tuple_outputs_are_counted(monkeypatch, fx_only):
    if fx_only:
        monkeypatch.setattr(memory_module, "_export_steps", lambda *args: 1 / 0)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    tensor = 16 * F32
    for inputs in ((a, b), [a, b], {"a": a, "b": b}, {"b": b, "a": a}):
        memory = peak_activation(Add(), inputs)
        assert memory.method == ("torch.fx" if fx_only else "torch.export")
        assert (memory.peak_bytes, memory.input_bytes) == (3 * tensor, 2 * tensor)
    # x + (values, indices) at the sort step; (values, indices) + sum at the add step.
    sort_out = tensor + 16 * 8
    memory = peak_activation(Sorted(), a)
    assert memory.peak_bytes == tensor + sort_out
    assert memory.activation_bytes == sort_out + tensor
