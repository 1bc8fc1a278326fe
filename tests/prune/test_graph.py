"""The dependency graph: groups of coupled channels and exact removal.

The exactness tests zero every weight that writes one unit (so the channel is zero everywhere
it flows) and check that removing that unit leaves the outputs unchanged: that holds only when
every member of the group was found and sliced at the right positions.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compactml import examples
from compactml.errors import CompactMLError
from compactml.examples.mobilenet import mobilenet_v2
from compactml.examples.resnet import resnet18
from compactml.prune.graph import Graph, Group
from compactml.prune.handlers import handler_for


def zero_unit(group: Group, unit: int) -> None:
    """Zero the weights of every layer writing ``unit`` (its "out" members)."""
    with torch.no_grad():
        for member in group.members:
            if member.dim != "out":
                continue
            module = group.graph.model.get_submodule(member.name)
            positions = torch.nonzero(member.unit_of == unit).reshape(-1)
            for tensor, axis in handler_for(module).params(module, "out"):
                tensor.index_fill_(axis, positions, 0.0)


def group_with(graph: Graph, label: str) -> Group:
    return next(g for g in graph.groups() if label in [m.label for m in g.members])


def removal_is_exact(model: nn.Module, x: torch.Tensor, label: str, unit: int) -> Graph:
    """Zero ``unit`` of the group holding member ``label``, remove it, compare outputs."""
    graph = Graph.build(model, x)
    group = group_with(graph, label)
    zero_unit(group, unit)
    with torch.no_grad():
        before = model(x)
        group.remove([unit])
        after = graph.model(x)
    assert after.shape == before.shape
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    return graph


class Concat(nn.Module):
    """Two branches concatenated along channels, scaled by a per-channel parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(10, 1, 1) + 0.5)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), F.relu(self.b(x))], dim=1) * self.scale
        return self.c(y).mean(dim=(2, 3))


def test_flatten_into_linear_maps_each_channel_to_its_features():
    model, task = examples.load("digits-cnn", progress=False)
    x = task.example_input()[:8]
    graph = Graph.build(model, x)
    group = group_with(graph, "features.conv3.out")
    fc = next(m for m in group.members if m.label == "classifier.in")
    assert fc.unit_of.tolist() == [c for c in range(32) for _ in range(4)]  # 2x2 per channel
    assert [m.label for m in group.members] == ["features.conv3.out", "features.bn3.out"] + [
        "classifier.in"
    ]
    graph = removal_is_exact(model, x, "features.conv3.out", 5)
    assert graph.model.classifier.in_features == 31 * 4
    assert graph.model.features.bn3.num_features == 31


def test_concatenation_offsets_and_parameter_member():
    torch.manual_seed(0)
    model = Concat().eval()
    x = torch.randn(2, 3, 6, 6)
    graph = Graph.build(model, x)
    group = group_with(graph, "c.in")
    units = {m.label: m.unit_of.tolist() for m in group.members}
    assert units["a.out"] == [0, 1, 2, 3]
    assert units["b.out"] == [4, 5, 6, 7, 8, 9]
    assert units["c.in"] == list(range(10))
    assert units["scale[0]"] == list(range(10))
    graph = removal_is_exact(model, x, "c.in", 6)
    assert (graph.model.a.out_channels, graph.model.b.out_channels) == (4, 5)
    assert graph.model.c.in_channels == 9 and graph.model.scale.shape == (9, 1, 1)
    group_with(graph, "c.in").remove([1])
    assert graph.model.a.out_channels == 3 and graph.model(x).shape == (2, 5)


def test_residual_adds_tie_every_block_of_a_stage():
    model = resnet18(num_classes=10, width=8)
    x = torch.randn(2, 3, 32, 32)
    graph = Graph.build(model, x)
    stage2 = group_with(graph, "layer2.0.downsample.0.out")
    labels = [m.label for m in stage2.members]
    for label in ("layer2.0.conv2.out", "layer2.1.conv2.out", "layer3.0.conv1.in"):
        assert label in labels
    assert stage2.size == 16
    graph = removal_is_exact(model, x, "layer2.0.downsample.0.out", 3)
    m = graph.model
    assert m.layer2[0].conv2.out_channels == m.layer2[1].conv2.out_channels == 15
    assert m.layer2[0].downsample[0].out_channels == 15 and m.layer3[0].conv1.in_channels == 15


def test_depthwise_convolution_couples_its_input_and_output():
    model = mobilenet_v2(num_classes=10, width_mult=0.25)
    x = torch.randn(2, 3, 32, 32)
    graph = Graph.build(model, x)
    group = group_with(graph, "features.2.block.depthwise.conv.out")
    labels = [m.label for m in group.members]
    assert labels[0] == "features.2.block.expand.conv.out"
    assert "features.2.block.project.conv.in" in labels
    graph = removal_is_exact(model, x, "features.2.block.depthwise.conv.out", 7)
    dw = graph.model.features[2].block.depthwise.conv
    assert dw.in_channels == dw.out_channels == dw.groups == 47


def test_inputs_outputs_and_dead_outputs_are_pinned():
    model = resnet18(num_classes=10, width=8)
    graph = Graph.build(model, torch.randn(1, 3, 32, 32))
    reasons = {g.name: g.pinned_reason() for g in graph.groups()}
    assert reasons["fc.out"] == "model output"
    assert "model input" in reasons["conv1.in"]
    assert reasons["layer1.0.conv1.out"] is None

    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.tanh(self.unused(x))
            return self.used(x)

    graph = Graph.build(Dead(), torch.randn(2, 4))
    assert group_with(graph, "unused.out").pinned_reason() == "not read by the rest of the model"


def test_partial_channel_selection_pins_the_group():
    class Slicer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)[:, :4])

    graph = Graph.build(Slicer(), torch.randn(1, 3, 4, 4))
    assert "keeps only part" in group_with(graph, "a.out").pinned_reason()


def test_remove_refuses_pinned_units_and_emptying():
    model = resnet18(num_classes=10, width=8)
    graph = Graph.build(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(CompactMLError, match="cannot be removed: model output"):
        group_with(graph, "fc.out").remove([0])
    inner = group_with(graph, "layer1.0.conv1.out")
    with pytest.raises(CompactMLError, match="empty group"):
        inner.remove(range(inner.size))
    with pytest.raises(CompactMLError, match="indices must be in 0..7"):
        inner.remove([8])
    assert inner.remove([]) == [] and inner.size == 8
    concat = group_with(Graph.build(Concat(), torch.randn(1, 3, 4, 4)), "c.in")
    with pytest.raises(CompactMLError, match="would leave a.out of group a.out with no channel"):
        concat.remove([0, 1, 2, 3])


def test_unknown_operation_names_it_and_exclude_keeps_that_module():
    class Roll(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.roll(self.conv(x), 1, dims=1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.mixer, self.head = nn.Conv2d(3, 3, 1), Roll(), nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.mixer(self.stem(x)))

    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(
        CompactMLError, match=r"'roll' called in module 'mixer'.*exclude=\('mixer',\)"
    ):
        Graph.build(Net(), x)
    graph = Graph.build(Net(), x, exclude=("mixer",))
    assert graph.opaque == {"mixer": "excluded by the include/exclude patterns"}
    assert "mixer" in group_with(graph, "stem.out").pinned_reason()
    assert "model input" in group_with(graph, "head.in").pinned_reason()


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(CompactMLError, match="cannot trace the model on the example input"):
        Graph.build(nn.Linear(4, 2), torch.randn(2, 3))


def test_interactive_scoring_and_removal():
    model, task = examples.load("digits-cnn", progress=False)
    graph = Graph.build(copy.deepcopy(model), task.example_input())
    groups = graph.score("l1")
    group = group_with(graph, "features.conv2.out")
    assert group in groups and group.importance.shape == (32,)
    assert group_with(graph, "classifier.out").importance is None  # pinned: not scored
    group.remove(torch.argsort(group.importance)[:4])
    assert group.importance.shape == (28,) and graph.model.features.conv3.in_channels == 28
    assert model.features.conv3.in_channels == 32
    with pytest.raises(CompactMLError, match="unknown importance 'l3'"):
        graph.score("l3")
