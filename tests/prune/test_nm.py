"""N:M pruning: exactly n non-zeros in every group of m inputs, skipped layers, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactml import examples
from compactml.config import history
from compactml.errors import CompactMLError
from compactml.prune import NM, prune, sparsity
from compactml.prune.masks import get_mask
from compactml.task import Task


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # 3 inputs: not divisible by 4
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 4, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x))))  # (b, 8, 2, 2)
        x = self.seq(x.flatten(2))  # (b, 4, 4)
        return self.fc(x.flatten(1))


def task() -> Task:
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, 2, 2, generator=g), torch.randint(0, 5, (4,), generator=g))
    return Task(train=[batch, batch], metric="accuracy")


def nonzeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    moved = weight.movedim(1, -1)
    return (moved != 0).reshape(*moved.shape[:-1], -1, m).sum(-1)


def test_every_group_keeps_exactly_n():
    model = Net()
    with pytest.warns(UserWarning, match="stem: input width 3 is not divisible by m=4"):
        pruned = prune(model, NM(n=2, m=4))
    for name in ("conv", "seq", "fc"):
        weight = getattr(pruned, name).weight
        assert (nonzeros_per_group(weight, 4) == 2).all(), name
        assert sparsity(pruned).layers[name] == 0.5
    assert get_mask(pruned.stem) is None
    [entry] = history(pruned)
    assert entry["changed"] == ["conv", "seq", "fc"]
    assert entry["skipped"] == {"stem": "input width 3 is not divisible by m=4"}
    assert entry["params"]["n"] == 2 and entry["sparsity"]["fc"] == 0.5


def test_kept_weights_are_the_largest_of_their_group():
    pruned = prune(Net(), NM(n=1, m=2, exclude=("stem",)))
    original = Net().fc.weight.abs().reshape(5, 8, 2)
    kept = get_mask(pruned.fc).reshape(5, 8, 2)
    assert torch.equal(kept[..., 0], original[..., 0] >= original[..., 1])


def test_taylor_criterion_ranks_by_gradient():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 1.0, 2.0, 0.5]]))
    model = nn.Sequential(layer)
    # Inputs 0 and 2 are always zero: their (large) weights do not matter to the loss.
    batch = (torch.tensor([[0.0, 1.0, 0.0, 2.0]]), torch.tensor([[3.0]]))
    data = Task(train=[batch], loss=lambda out, target: ((out - target) ** 2).mean())
    assert get_mask(prune(model, NM(2, 4), data)[0]).tolist() == [[True, False, True, False]]
    by_taylor = prune(model, NM(2, 4, criterion="taylor"), data)
    assert get_mask(by_taylor[0]).tolist() == [[False, True, False, True]]


def test_input_untouched_and_nothing_to_prune():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, NM(2, 4, exclude=("stem",)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert model.state_dict().keys() == before.keys() and not history(model)
    with pytest.warns(UserWarning), pytest.raises(CompactMLError, match="no selected layer"):
        prune(model, NM(2, 4, include=("stem",)))
    assert prune(model, NM(4, 4, exclude=("stem",))).fc.weight.count_nonzero() == 80


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 5, "m": 4}, "greater than m"),
        ({"n": 0, "m": 4}, ">= 1"),
        ({"n": 2, "m": 4.0}, ">= 1"),
        ({"criterion": "l1"}, "magnitude, taylor"),
        ({"batches": 0}, "batches"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(CompactMLError, match=message):
        NM(**kwargs)


def test_taylor_criterion_needs_train_data():
    with pytest.raises(CompactMLError, match="task.train"):
        prune(Net(), NM(criterion="taylor", exclude=("stem",)))


def test_digits_cnn_two_of_four():
    model, data = examples.load("digits-cnn", progress=False)
    with pytest.warns(UserWarning, match="features.conv1"):
        pruned = prune(model, NM(2, 4), data)
    for name in ("features.conv2", "features.conv3", "classifier"):
        assert (nonzeros_per_group(pruned.get_submodule(name).weight, 4) == 2).all()
    assert NM.level is None
