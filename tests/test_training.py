"""fine_tune: the shared training loop (loss goes down, masks kept, modes restored, errors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.prune.masks import attach_mask, get_mask
from compactml.task import Task, eval_mode
from compactml.training import fine_tune


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()


def task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return Task(train=[(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)], metric="accuracy")


def mean_loss(net: nn.Module, data: Task) -> float:
    with torch.no_grad(), eval_mode(net):
        return sum(float(data.batch_loss(net, b)) for b in data.batches("train")) / 4


def test_fine_tune_trains_in_place_and_restores_modes():
    net, data = model(), task()
    net[3].train()  # a mixed set of flags comes back as it was
    before = mean_loss(net, data)
    flags = [m.training for m in net.modules()]
    running = net[1].running_mean.clone()
    out = fine_tune(net, data, epochs=20, lr=3e-2, progress=False)
    assert out is net
    assert [m.training for m in net.modules()] == flags
    assert not torch.equal(net[1].running_mean, running)  # BatchNorm trained in train mode
    assert mean_loss(net, data) < 0.5 * before
    assert all(p.grad is None for p in net.parameters())


def test_masks_are_kept_when_the_model_has_them():
    net, data = model(), task()
    mask = torch.rand(8, 4, generator=torch.Generator().manual_seed(3)) > 0.5
    attach_mask(net[0], mask)
    fine_tune(net, data, epochs=2, lr=1e-2, progress=False)
    assert (net[0].weight[~mask] == 0).all() and (net[0].weight[mask] != 0).all()
    fine_tune(net, data, epochs=1, lr=1e-2, progress=False, keep=False)
    assert (net[0].weight[~mask] != 0).any()  # keep=False lets them move
    assert torch.equal(get_mask(net[0]), mask)


def test_a_custom_loss_and_zero_epochs():
    net, data = model(), task()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fine_tune(net, data, epochs=0, lr=1e-2, progress=False)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    seen = []

    def loss(m, batch):
        seen.append(len(batch[0]))
        return m(batch[0]).pow(2).mean()  # drives every output to zero

    fine_tune(net, data, epochs=3, lr=1e-2, progress=False, loss=loss)
    assert seen == [16] * 12
    with torch.no_grad():
        assert net.eval()(torch.randn(8, 4)).abs().mean() < 0.5


def test_bad_arguments_and_non_finite_loss():
    net, data = model(), task()
    for epochs, lr in ((-1, 1e-3), (1.5, 1e-3), (1, 0.0), (1, float("inf")), (True, 1e-3)):
        with pytest.raises(CompactMLError, match="epochs|lr"):
            fine_tune(net, data, epochs, lr, progress=False)
    with pytest.raises(CompactMLError, match="train batches"):
        fine_tune(net, Task(eval=[]), 1, 1e-3, progress=False)
    with pytest.raises(CompactMLError, match=r"lower lr \(now 0.5\)"):
        fine_tune(net, data, 1, 0.5, progress=False, loss=lambda m, b: m(b[0]).sum() / 0.0)
