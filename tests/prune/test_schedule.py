"""Schedules: the cubic ramp, fine-tuning between steps, rewinding, and resuming a run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import compactml as cml
from compactml import examples, training
from compactml.errors import CompactMLError
from compactml.prune import Iterative, Magnitude, Taylor, prune, sparsity
from compactml.prune.masks import get_mask, masked_layers
from compactml.prune.schedule import rewind
from compactml.task import Task


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()


def tiny_task() -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return Task(train=[(x[:16], y[:16]), (x[16:], y[16:])], eval=[(x, y)], metric="accuracy")


def record_calls(monkeypatch, fail_at: int | None = None) -> list[tuple[str, float]]:
    """Patch fine_tune to note (description, model sparsity) and fail at call ``fail_at``."""
    calls: list[tuple[str, float]] = []
    real = training.fine_tune

    def patched(model, task, epochs, lr, **kwargs):
        calls.append((kwargs["description"], sparsity(model).total))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("interrupted")
        return real(model, task, epochs, lr, **kwargs)

    monkeypatch.setattr(training, "fine_tune", patched)
    return calls


def test_cubic_and_linear_ramps():
    cubic = Iterative(steps=5)
    assert [round(cubic.sparsity_at(t, 0.8), 6) for t in range(1, 6)] == [
        round(0.8 * (1 - (1 - t / 5) ** 3), 6) for t in range(1, 6)
    ]
    assert cubic.sparsity_at(1, 0.8) == pytest.approx(0.3904)
    assert cubic.sparsity_at(5, 0.8) == 0.8
    linear = Iterative(steps=4, ramp="linear")
    assert [linear.sparsity_at(t, 0.8) for t in range(1, 5)] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_iterative_prunes_on_the_ramp_and_fine_tunes_between(monkeypatch):
    calls = record_calls(monkeypatch)
    model = tiny()
    schedule = Iterative(steps=4, epochs=2, lr=1e-2, progress=False)
    pruned = prune(model, Magnitude(0.75, scope="global", schedule=schedule), tiny_task())
    assert [d for d, _ in calls] == [f"fine-tuning (step {t}/4)" for t in range(1, 5)]
    assert [s for _, s in calls] == pytest.approx(
        [schedule.sparsity_at(t, 0.75) for t in range(1, 5)], abs=0.01
    )
    assert sum(int((~get_mask(layer)).sum()) for _, layer in masked_layers(pruned)) == 108
    for _, layer in masked_layers(pruned):
        assert (layer.weight[~get_mask(layer)] == 0).all()  # stayed zero through fine-tuning
    assert not torch.equal(pruned[1].running_mean, model[1].running_mean)  # BN trained


def test_taylor_iterative_runs():
    pruned = prune(tiny(), Taylor(0.5, schedule=Iterative(steps=2, progress=False)), tiny_task())
    assert sparsity(pruned).layers == {"0": 0.5, "3": 0.5}


def test_rewind_puts_surviving_weights_back():
    model = tiny()
    pruned = prune(model, Magnitude(0.5), None)
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(1.0)
    rewind(pruned, model)
    mask = get_mask(pruned[0])
    assert torch.equal(pruned[0].weight, model[0].weight * mask)
    assert torch.equal(pruned[0].bias, model[0].bias) and get_mask(pruned[3]) is not None


def test_iterative_with_rewind_retrains_from_the_input_values(monkeypatch):
    calls = record_calls(monkeypatch)
    real = training.fine_tune
    model = tiny()

    def no_rewound_training(m, task, epochs, lr, **kwargs):
        if kwargs["description"] == "rewound training":
            assert epochs == 3 * 2
            calls.append(("rewound", 0.0))
            return m
        return real(m, task, epochs, lr, **kwargs)

    monkeypatch.setattr(training, "fine_tune", no_rewound_training)
    schedule = Iterative(steps=3, epochs=2, rewind=True, progress=False)
    pruned = prune(model, Magnitude(0.6, schedule=schedule), tiny_task())
    assert calls[-1] == ("rewound", 0.0)
    for index in (0, 3):
        mask = get_mask(pruned[index])
        assert torch.equal(pruned[index].weight, model[index].weight * mask)
        assert (~mask).sum() == round(0.6 * mask.numel())


def test_iterative_needs_train_data_and_validates():
    with pytest.raises(CompactMLError, match="task.train"):
        prune(tiny(), Magnitude(0.5, schedule=Iterative()), Task(eval=[]))
    without_training = Iterative(steps=3, epochs=0, progress=False)  # a gradual mask, no data
    assert sparsity(prune(tiny(), Magnitude(0.5, schedule=without_training))).total == 0.5
    for kwargs, message in [
        ({"steps": 0}, "steps"),
        ({"epochs": -1}, "epochs"),
        ({"lr": 0}, "lr"),
        ({"ramp": "exp"}, "cubic, linear"),
        ({"rewind": 1}, "rewind"),
        ({"checkpoint": 3}, "checkpoint"),
    ]:
        with pytest.raises(CompactMLError, match=message):
            Iterative(**kwargs)


def test_a_checkpointed_run_resumes_after_the_last_finished_step(tmp_path, monkeypatch):
    model, data = tiny(), tiny_task()
    reference = prune(model, Magnitude(0.8, schedule=Iterative(progress=False)), data)

    config = Magnitude(0.8, schedule=Iterative(checkpoint=str(tmp_path / "run"), progress=False))
    calls = record_calls(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        prune(model, config, data)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 2 and not state["rewound"]
    assert [p.name for p in (tmp_path / "run").glob("*.safetensors")] == ["step-2.safetensors"]

    calls = record_calls(monkeypatch)
    resumed = prune(model, config, data)
    assert [d for d, _ in calls] == [f"fine-tuning (step {t}/5)" for t in (3, 4, 5)]
    assert calls[0][1] == pytest.approx(Iterative().sparsity_at(3, 0.8), abs=0.02)
    assert resumed.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key

    calls = record_calls(monkeypatch)
    again = prune(model, config, data)  # finished: nothing left to do
    assert calls == [] and torch.equal(again[0].weight, reference[0].weight)
    with pytest.raises(CompactMLError, match="another config"):
        prune(model, Magnitude(0.7, schedule=config.schedule), data)


def test_digits_cnn_iterative_ends_at_the_sparsity():
    model, task = examples.load("digits-cnn", progress=False)
    schedule = Iterative(steps=5, epochs=1, progress=False)
    pruned = prune(model, Magnitude(0.8, schedule=schedule), task)
    for name, layer in masked_layers(pruned):
        assert int((layer.weight == 0).sum()) == round(0.8 * layer.weight.numel()), name
    assert sparsity(pruned).total == pytest.approx(0.8, abs=1e-4)
    assert cml.evaluate(pruned, task)["top1"] > 0.9
