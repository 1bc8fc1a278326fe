"""Channels: validation, smaller dense models, importance, round_to, records, save/load."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import compactml
from compactml import examples
from compactml.config import history
from compactml.errors import CompactMLError
from compactml.examples.mobilenet import mobilenet_v2
from compactml.examples.resnet import resnet18
from compactml.prune.masks import attach_mask
from compactml.prune.structured import Channels
from compactml.source import load_factory
from compactml.task import Task


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(name="tiny_resnet")
def tiny_resnet_fixture() -> tuple[nn.Module, Task]:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return resnet18(num_classes=10, width=16), Task(example=x)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, "ratio must be a fraction in"),
        ({"ratio": -0.1}, "ratio must be a fraction in"),
        ({"ratio": True}, "ratio must be a fraction in"),
        ({"ratio": "0.5"}, "ratio must be a fraction in"),
        ({"ratio": 0.5, "importance": "random"}, "unknown importance 'random'"),
        ({"ratio": 0.5, "round_to": 0}, "round_to must be a whole number"),
        ({"ratio": 0.5, "round_to": 2.5}, "round_to must be a whole number"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(CompactMLError, match=message):
        Channels(**kwargs)


def test_half_the_channels_quarter_the_parameters(tiny_resnet):
    model, task = tiny_resnet
    before = snapshot(model)
    pruned = Channels(ratio=0.5).apply(model, task)
    x = task.example_input()
    assert pruned(x).shape == model(x).shape == (2, 10)
    ratio = n_params(pruned) / n_params(model)
    assert 0.22 < ratio < 0.30  # (1 - 0.5)**2 for the convolutions, the classifier's outputs stay
    assert pruned.layer3[0].conv1.out_channels == 32 and pruned.fc.in_features == 64
    after = model.state_dict()  # the input model is untouched
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ratio_zero_gives_an_equal_model(tiny_resnet):
    model, task = tiny_resnet
    pruned = Channels(ratio=0.0).apply(model, task)
    x = task.example_input()
    assert n_params(pruned) == n_params(model)
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


def test_removing_the_least_important_channels_hurts_less_than_random():
    model, task = examples.load("digits-cnn", progress=False)
    x = next(task.batches("eval"))[0]
    with torch.no_grad():
        reference = model(x)

    def damage(label: str, choose) -> float:
        group = next(g for g in Channels(ratio=0.5).groups(model, task) if g.name == label)
        group.remove(choose(group))
        with torch.no_grad():
            return float((group.graph.model(x) - reference).pow(2).mean())

    for label in ("features.conv2.out", "features.conv3.out"):
        lowest = damage(label, lambda g: torch.argsort(g.importance)[: g.size // 4])
        randoms = [
            damage(label, lambda g, s=s: torch.randperm(g.size, generator=s)[: g.size // 4])
            for s in (torch.Generator().manual_seed(i) for i in range(5))
        ]
        assert lowest < sum(randoms) / len(randoms)


@pytest.mark.parametrize("importance", ["l2", "taylor", "bn_scale"])
def test_every_importance_prunes_digits_cnn(importance):
    model, task = examples.load("digits-cnn", progress=False)
    pruned = Channels(ratio=0.5, importance=importance).apply(model, task)
    assert pruned.features.conv2.out_channels == 16 and pruned.classifier.in_features == 64
    batch = next(task.batches("eval"))
    assert pruned(batch[0]).shape == (len(batch[0]), 10)


def test_taylor_needs_training_data_and_bn_scale_needs_a_norm():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    task = Task(example=torch.randn(3, 4))
    with pytest.raises(CompactMLError, match="taylor' needs training batches"):
        Channels(ratio=0.5, importance="taylor").apply(mlp, task)
    pruned = Channels(ratio=0.5, importance="bn_scale").apply(mlp, task)
    assert pruned[0].out_features == 8
    assert "reads no tensor" in history(pruned)[-1]["skipped"]["0.out"]


def test_round_to_keeps_multiples(tiny_resnet):
    model, task = tiny_resnet
    pruned = Channels(ratio=0.5, round_to=3).apply(model, task)
    assert pruned.layer1[0].conv1.out_channels == 9  # 8 kept, rounded up to a multiple of 3
    assert pruned.layer4[0].conv1.out_channels == 66  # 64 of 128 -> 66
    assert pruned(task.example_input()).shape == (2, 10)


def test_a_group_is_never_emptied():
    mlp = nn.Sequential(nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 3))
    with pytest.warns(UserWarning, match=r"0.out: kept 1 of 1 \(at least one kept\)"):
        pruned = Channels(ratio=0.6).apply(mlp, Task(example=torch.randn(2, 4)))
    assert pruned[0].out_features == 1


def test_mobilenet_v2_prunes_with_depthwise_and_inverted_residuals():
    model = mobilenet_v2(num_classes=10, width_mult=0.5)
    x = torch.randn(2, 3, 32, 32)
    pruned = Channels(ratio=0.5).apply(model, Task(example=x))
    assert pruned(x).shape == (2, 10)
    for block in pruned.features[1:-1]:
        dw = block.block.depthwise.conv
        assert dw.in_channels == dw.out_channels == dw.groups
    assert n_params(pruned) < 0.45 * n_params(model)


def test_exclude_keeps_the_modules_and_what_is_tied_to_them(tiny_resnet):
    model, task = tiny_resnet
    pruned = Channels(ratio=0.5, exclude=("layer1",)).apply(model, task)
    for name in ("conv1", "layer1.0.conv1", "layer1.1.conv2"):
        assert pruned.get_submodule(name).weight.shape == model.get_submodule(name).weight.shape
    assert pruned.layer2[0].conv1.in_channels == 16  # reads layer1: kept
    assert pruned.layer2[0].conv1.out_channels == 16  # its own group (of 32): pruned
    skipped = history(pruned)[-1]["skipped"]
    assert "excluded" in skipped["conv1.out"]


def test_history_records_groups_and_changed_layers(tiny_resnet):
    model, task = tiny_resnet
    entry = history(Channels(ratio=0.25).apply(model, task))[-1]
    assert entry["technique"] == "Channels" and entry["family"] == "prune"
    assert "layer1.0.conv1" in entry["changed"] and "fc" in entry["changed"]
    assert entry["skipped"]["fc.out"] == "model output"
    first = entry["groups"][0]
    assert first["before"] - first["after"] == round(0.25 * first["before"])


def test_needs_a_task_for_the_example_input(tiny_resnet):
    with pytest.raises(CompactMLError, match="pass a task"):
        Channels(ratio=0.5).apply(tiny_resnet[0])


def test_saved_pruned_resnet_rebuilds_bit_exact(tmp_path):
    factory = tmp_path / "net.py"
    factory.write_text(
        textwrap.dedent(
            """
            from compactml.examples.resnet import resnet18

            def build():
                return resnet18(num_classes=10, width=8)
            """
        )
    )
    model, _ = load_factory(f"{factory}:build")
    x = torch.randn(2, 3, 32, 32)
    pruned = Channels(ratio=0.5).apply(model, Task(example=x))
    loaded = compactml.load(compactml.save(pruned, tmp_path / "pruned.cml"), trust_factory=True)
    assert loaded.layer2[0].downsample[0].out_channels == 8
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


def test_pruning_masks_are_cut_with_their_weights(tiny_resnet):
    model, task = tiny_resnet
    conv = model.layer1[0].conv1
    attach_mask(
        conv, torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    )
    pruned = Channels(ratio=0.5).apply(model, task).layer1[0].conv1
    assert pruned.weight_mask.shape == pruned.weight.shape == (8, 8, 3, 3)
    assert bool(((pruned.weight != 0) <= pruned.weight_mask).all())


def test_pinned_channels_of_a_group_stay_with_a_warning():
    class WithInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = nn.Conv2d(3, 5, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.cat([self.a(x), x], dim=1)).mean(dim=(2, 3))

    # The 3 input channels cannot go, and a keeps one channel of its own.
    with pytest.warns(UserWarning, match=r"a.out: kept 4 of 8 \(2 cannot be removed\)"):
        pruned = Channels(ratio=0.75).apply(WithInput(), Task(example=torch.randn(1, 3, 4, 4)))
    assert (pruned.a.out_channels, pruned.c.in_channels) == (1, 4)


def test_include_picks_the_groups_a_layer_produces():
    model, task = examples.load("digits-cnn", progress=False)
    pruned = Channels(ratio=0.5, include=("features.conv2",)).apply(model, task)
    f = pruned.features
    assert (f.conv1.out_channels, f.conv2.out_channels, f.conv3.out_channels) == (16, 16, 32)
    assert f.conv3.in_channels == 16 and f.bn2.num_features == 16  # readers are sliced along
