"""cml.evaluate on classification tasks: metrics, agreement, noise, modes and errors."""

import copy
import json

import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.evaluate import PRIMARY, Metrics, evaluate
from compactml.task import Task


def blobs(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two blobs separated along one axis; three wide irrelevant axes set the input scale."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    centers = torch.tensor([[-1.5, 0.0, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0]])
    spread = torch.tensor([0.3, 2.0, 2.0, 2.0])
    return centers[labels] + spread * torch.randn(n, 4, generator=g), labels


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Task]:
    torch.manual_seed(0)
    x, y = blobs()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    ex, ey = blobs(300, seed=1)
    task = Task(eval=[(ex[i : i + 100], ey[i : i + 100]) for i in range(0, 300, 100)])
    return model, task


class Fixed(nn.Module):
    """Logits are the inputs themselves, optionally with the first two classes swapped."""

    def __init__(self, swap: bool = False) -> None:
        super().__init__()
        self.swap = swap
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, [1, 0, 2]] if self.swap else x) * self.scale


HAND_X = torch.tensor([[3.0, 1, 0], [0, 0, 5], [1, 3, 0], [0, 1, 4]])
HAND_Y = torch.tensor([0, 2, 0, 1])


def test_classification_keys_and_values_on_hand_case():
    metrics = evaluate(Fixed(), Task(eval=[(HAND_X, HAND_Y)]), noise_levels=())
    assert isinstance(metrics, Metrics) and metrics.kind == "classification"
    assert metrics["samples"] == 4
    assert metrics["top1"] == pytest.approx(0.5)  # predictions 0, 2, 1, 2
    assert metrics["top5"] == 1.0  # three classes: top-3
    assert metrics["per_class_accuracy"] == {"0": 0.5, "1": 0.0, "2": 1.0}
    assert metrics.primary == PRIMARY["classification"][0] == "top1"
    assert metrics.primary_value == metrics["top1"]
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["brier"] <= 2 and metrics["nll"] > 0
    assert "noise" not in metrics and "agreement" not in metrics
    assert json.loads(json.dumps(metrics)) == dict(metrics)


def test_agreement_with_itself_and_with_a_flipping_model():
    task = Task(eval=[(HAND_X[:2], HAND_Y[:2]), (HAND_X[2:], HAND_Y[2:])])
    assert evaluate(Fixed(), task, Fixed(), noise_levels=())["agreement"] == 1.0
    # swapping classes 0 and 1 changes the argmax of rows 0 and 2 only
    assert evaluate(Fixed(swap=True), task, Fixed(), noise_levels=())["agreement"] == 0.5
    task.reference = Fixed(swap=True)  # used when no reference argument is given
    assert evaluate(Fixed(), task, noise_levels=())["agreement"] == 0.5


def test_noise_curve_starts_clean_drops_and_is_reproducible(trained):
    model, task = trained
    metrics = evaluate(model, task)
    assert metrics["top1"] > 0.95
    curve = metrics["noise"]
    assert [p["sigma"] for p in curve] == [0.0, 0.1, 0.25, 0.5, 1.0]
    assert curve[0]["top1"] == metrics["top1"]
    assert curve[-1]["top1"] < metrics["top1"] - 0.05
    assert evaluate(model, task)["noise"] == curve
    custom = evaluate(model, task, noise_levels=[0.0, 2.0])["noise"]
    assert [p["sigma"] for p in custom] == [0.0, 2.0] and custom[1]["top1"] < curve[-1]["top1"]


def test_integer_token_inputs_and_dict_batches_skip_noise():
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 3)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.bag(input_ids)

    ids = torch.randint(0, 10, (6, 5), generator=torch.Generator().manual_seed(0))
    task = Task(eval=[{"input_ids": ids, "labels": torch.tensor([0, 1, 2, 0, 1, 2])}])
    metrics = evaluate(Bag(), task)
    assert metrics["samples"] == 6 and "noise" not in metrics
    tuple_task = Task(eval=[(ids, torch.tensor([0, 1, 2, 0, 1, 2]))], forward=lambda m, x: m(x))
    assert "noise" not in evaluate(Bag(), tuple_task)


def test_eval_mode_during_and_flags_restored_after():
    seen = []

    class Recorder(Fixed):
        def forward(self, x):
            seen.append(self.training)
            return super().forward(x)

    model = nn.Sequential(Recorder(), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    before = copy.deepcopy(model.state_dict())
    evaluate(model, Task(eval=[(HAND_X, HAND_Y)]), noise_levels=())
    assert seen == [False]
    assert model.training and model[0].training and not model[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_limit_counts_batches(trained):
    model, task = trained
    assert evaluate(model, task, limit=1, noise_levels=())["samples"] == 100
    with pytest.raises(CompactMLError, match="limit"):
        evaluate(model, task, limit=0)


def test_progress_bar_runs(trained):
    model, task = trained
    assert evaluate(model, task, progress=True, noise_levels=(0.0, 0.5))["samples"] == 300


def test_user_errors_are_one_line():
    with pytest.raises(CompactMLError, match="no eval data"):
        evaluate(Fixed(), Task(calib=[HAND_X]))
    with pytest.raises(CompactMLError, match="cannot run") as info:
        evaluate(nn.Linear(3, 3), Task(eval=[(torch.zeros(4, 5), HAND_Y)]))
    assert "\n" not in str(info.value)
    broken = Fixed()
    with torch.no_grad():
        broken.scale.fill_(float("nan"))
    with pytest.raises(CompactMLError, match="NaN"):
        evaluate(broken, Task(eval=[(HAND_X, HAND_Y)]))
    with pytest.raises(CompactMLError, match="need labels"):
        evaluate(Fixed(), Task(eval=[(HAND_X,)]))
    with pytest.raises(CompactMLError, match="noise_levels"):
        evaluate(Fixed(), Task(eval=[(HAND_X, HAND_Y)]), noise_levels=[-1.0])
    with pytest.raises(CompactMLError, match="no batches"):
        evaluate(Fixed(), Task(eval=[]))


def test_one_shot_iterator_is_refused_for_the_noise_pass(trained):
    model, _ = trained
    x, y = blobs(50)
    with pytest.raises(CompactMLError, match="one-shot iterator"):
        evaluate(model, Task(eval=iter([(x, y)])))
    assert evaluate(model, Task(eval=lambda: iter([(x, y)])))["noise"][0]["sigma"] == 0.0


def test_custom_metric_callable():
    def score(model, task):
        return {"f1": torch.tensor(0.8), "support": 10}

    metrics = evaluate(Fixed(), Task(metric=score))
    assert metrics.kind == "custom" and metrics["kind"] == "custom"
    assert metrics.primary == "f1" and metrics.primary_value == pytest.approx(0.8)
    assert isinstance(metrics["f1"], float)
    with pytest.raises(CompactMLError, match="non-empty dict"):
        evaluate(Fixed(), Task(metric=lambda m, t: 0.5))
