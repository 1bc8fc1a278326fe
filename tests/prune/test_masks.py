"""Masks as buffers: attaching, combining, keeping them through optimizer steps, saving."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactml as cml
from compactml import examples
from compactml.errors import CompactMLError
from compactml.prune import Magnitude, prune
from compactml.prune.masks import (
    MASK,
    apply_masks,
    attach_mask,
    get_mask,
    keep_masks,
    masked_layers,
    remove_masks,
    sparsity,
)
from compactml.training import fine_tune


def _linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def test_attach_mask_zeroes_and_registers_a_persistent_buffer():
    layer = _linear()
    mask = torch.tensor([[True, False, True, False]] * 3)
    before = layer.weight.detach().clone()
    combined = attach_mask(layer, mask)
    assert torch.equal(combined, mask)
    assert get_mask(layer).dtype == torch.bool
    assert f"{MASK}" in layer.state_dict()
    assert torch.equal(layer.weight.detach(), before * mask)
    assert (layer.weight[~mask] == 0).all()


def test_a_second_mask_keeps_the_intersection():
    layer = _linear()
    first = torch.tensor([[True, False, True, True]] * 3)
    second = torch.tensor([[True, True, False, True]] * 3)
    attach_mask(layer, first)
    combined = attach_mask(layer, second)
    assert combined.tolist() == [[True, False, False, True]] * 3
    assert torch.equal(get_mask(layer), combined)
    assert (layer.weight[:, 1] == 0).all() and (layer.weight[:, 2] == 0).all()


def test_attach_mask_refuses_a_wrong_shape_and_a_layer_without_weight():
    with pytest.raises(CompactMLError, match="shape"):
        attach_mask(_linear(), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(CompactMLError, match="no weight"):
        attach_mask(nn.ReLU(), torch.ones(1, dtype=torch.bool))


def test_apply_masks_re_zeroes():
    model = nn.Sequential(_linear(), nn.ReLU(), nn.Linear(3, 2))
    attach_mask(model[0], torch.tensor([[False, True, True, True]] * 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    apply_masks(model)
    assert (model[0].weight[:, 0] == 0).all() and (model[0].weight[:, 1:] == 1).all()
    assert [name for name, _ in masked_layers(model)] == ["0"]


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    x = torch.randn(8, 4)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()


def test_keep_masks_holds_pruned_weights_at_zero_through_steps():
    model = nn.Sequential(_linear())
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) > 0.5
    attach_mask(model[0], mask)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    handle = keep_masks(optimizer, model)
    before = model[0].weight.detach().clone()
    _train_steps(model, optimizer, 5)
    assert (model[0].weight[~mask] == 0).all()
    assert not torch.equal(model[0].weight[mask], before[mask])  # the rest did train
    handle.remove()
    _train_steps(model, optimizer, 2)
    assert (model[0].weight[~mask] != 0).any()  # without the hook, Adam moves them


def test_sparsity_reports_layers_and_total():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Conv1d(2, 2, 3), nn.LayerNorm(3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(1.0)
    attach_mask(model[0], torch.tensor([[False, False, True, True]] * 3))
    report = sparsity(model)
    assert report.layers == {"0": 0.5, "1": 0.0}  # LayerNorm is no prunable layer
    assert (report.zeros, report.numel) == (6, 24)
    assert report.total == 0.25
    assert report.as_dict() == {"total": 0.25, "layers": {"0": 0.5, "1": 0.0}}


def test_remove_masks_drops_buffers_and_keeps_zeros():
    model = nn.Sequential(_linear())
    mask = torch.tensor([[True, False, True, False]] * 3)
    attach_mask(model[0], mask)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # un-zeroed by hand: removing re-applies first
    remove_masks(model)
    assert get_mask(model[0]) is None and MASK not in model[0].state_dict()
    assert (model[0].weight[~mask] == 0).all()
    assert sparsity(model).total == 0.5


def test_a_saved_masked_model_keeps_its_masks(tmp_path):
    model, task = examples.load("digits-cnn", progress=False)
    pruned = prune(model, Magnitude(sparsity=0.6), task)
    path = cml.save(pruned, tmp_path / "pruned.cml")
    loaded = cml.load(path)
    names = [name for name, _ in masked_layers(loaded)]
    assert names == [name for name, _ in masked_layers(pruned)] and len(names) == 4
    for (key, want), (other, have) in zip(
        pruned.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert key == other and torch.equal(want, have)
    # The restored masks still hold: fine-tuning the loaded model keeps the zeros.
    fine_tune(loaded, task, epochs=1, lr=1e-2, progress=False)
    for name, layer in masked_layers(loaded):
        assert (layer.weight[~get_mask(layer)] == 0).all(), name
    assert sparsity(loaded).layers["classifier"] == pytest.approx(0.6)
