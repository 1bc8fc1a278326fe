"""Magnitude and Taylor pruning: exact counts, scopes, input untouched, history, bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import compactml as cml
from compactml import examples
from compactml.config import history
from compactml.errors import CompactMLError
from compactml.prune import Iterative, Magnitude, OneShot, Taylor, prune, sparsity
from compactml.prune.masks import MASK, get_mask
from compactml.quantize import WeightOnly
from compactml.task import Task
from compactml.training import fine_tune


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3),  # weight 24
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 8),  # weight 128
        nn.ReLU(),
        nn.Linear(8, 3),  # weight 24
    ).eval()


def tiny_task() -> Task:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 2, 6, generator=g), torch.randint(0, 3, (6,), generator=g))]
    return Task(train=batches * 3, eval=batches, metric="accuracy")


def pruned_count(layer: nn.Module) -> int:
    return int((~get_mask(layer)).sum())


def test_layer_scope_prunes_each_layer_exactly():
    model = tiny()
    pruned = prune(model, Magnitude(sparsity=0.7))
    for index in (0, 3, 5):
        layer = pruned[index]
        assert pruned_count(layer) == round(0.7 * layer.weight.numel())
        kept = layer.weight.abs()[get_mask(layer)]
        dropped = model[index].weight.abs()[~get_mask(layer)]
        assert dropped.max() <= kept.min()  # the smallest magnitudes went
        assert (layer.weight[~get_mask(layer)] == 0).all()
    assert torch.equal(pruned[3].bias, model[3].bias)


def test_global_scope_uses_one_threshold():
    model = tiny()
    pruned = prune(model, Magnitude(0.5, scope="global"))
    layers = [pruned[i] for i in (0, 3, 5)]
    assert sum(pruned_count(layer) for layer in layers) == round(0.5 * 176)
    threshold = max(model[i].weight.abs()[~get_mask(pruned[i])].max() for i in (0, 3, 5))
    assert all((model[i].weight.abs()[get_mask(pruned[i])] >= threshold).all() for i in (0, 3, 5))
    per_layer = [sparsity(pruned).layers[str(i)] for i in (0, 3, 5)]
    assert len(set(per_layer)) > 1  # unlike the layer scope, layers end at different sparsities


def test_the_input_model_is_untouched():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for config in (
        Magnitude(0.5),
        Taylor(0.5, scope="global"),
        Magnitude(0.5, schedule=Iterative(steps=2, epochs=1, progress=False)),
    ):
        prune(model, config, tiny_task())
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        assert not history(model) and get_mask(model[3]) is None


def test_history_is_recorded_and_json_able():
    pruned = prune(tiny(), Magnitude(0.5, schedule=Iterative(steps=2, progress=False)), tiny_task())
    [entry] = history(pruned)
    assert entry["technique"] == "Magnitude" and entry["family"] == "prune"
    assert entry["changed"] == ["0", "3", "5"] and entry["skipped"] == {}
    assert entry["params"]["schedule"]["kind"] == "iterative"
    assert entry["sparsity"]["3"] == 0.5
    json.dumps(entry)


def test_include_exclude_and_non_finite_weights():
    model = tiny()
    pruned = prune(model, Magnitude(0.5, exclude=("5",)))
    assert get_mask(pruned[5]) is None and get_mask(pruned[3]) is not None
    with torch.no_grad():
        model[0].weight[0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="0: the weight has NaN"):
        pruned = prune(model, Magnitude(0.5))
    assert list(history(pruned)[0]["skipped"]) == ["0"]
    assert get_mask(pruned[0]) is None
    with pytest.raises(CompactMLError, match="no Linear, Conv1d or Conv2d"):
        prune(model, Magnitude(0.5, include=("nothing*",)))


def test_pruning_a_pruned_model_never_revives_weights():
    first = prune(tiny(), Magnitude(0.5))
    again = prune(first, Magnitude(0.3))
    assert torch.equal(get_mask(again[3]), get_mask(first[3]))
    more = prune(first, Magnitude(0.75))
    assert pruned_count(more[3]) == 96
    assert not (get_mask(more[3]) & ~get_mask(first[3])).any()
    assert len(history(more)) == 2


def test_taylor_uses_gradients():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 1.0]]))
    model = nn.Sequential(layer)
    batch = (torch.tensor([[0.0, 1.0], [0.0, -2.0]]), torch.tensor([[1.0], [1.0]]))
    task = Task(train=[batch], loss=lambda out, target: ((out - target) ** 2).mean())
    by_taylor = prune(model, Taylor(0.5), task)
    by_magnitude = prune(model, Magnitude(0.5), task)
    assert get_mask(by_taylor[0]).tolist() == [[False, True]]  # the unused input goes
    assert get_mask(by_magnitude[0]).tolist() == [[True, False]]  # the smaller weight goes


def test_taylor_needs_train_data():
    with pytest.raises(CompactMLError, match="task.train"):
        prune(tiny(), Taylor(0.5))
    with pytest.raises(CompactMLError, match="task.train"):
        prune(tiny(), Taylor(0.5), Task(eval=[]))
    with pytest.raises(CompactMLError, match="task.train"):
        prune(tiny(), Magnitude(0.5, schedule=Iterative()), None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"sparsity": -0.2}, r"\[0, 1\)"),
        ({"sparsity": True}, r"\[0, 1\)"),
        ({"sparsity": 0.5, "scope": "model"}, "'layer'"),
        ({"sparsity": 0.5, "schedule": "gradual"}, "OneShot"),
        ({"sparsity": 0.5, "schedule": {"kind": "iterative", "step": 3}}, "schedule"),
        ({"sparsity": 0.5, "batches": 0}, "batches"),
    ],
)
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(CompactMLError, match=message):
        Taylor(**kwargs)


def test_schedule_from_recipe_values_and_wrong_family():
    config = Magnitude(0.5, schedule={"kind": "iterative", "steps": 3, "epochs": 2})
    assert config.schedule == Iterative(steps=3, epochs=2)
    assert Magnitude(0.5, schedule="one_shot").schedule == OneShot()
    assert Magnitude(**Magnitude(0.5, schedule=Iterative()).params()) == Magnitude(
        0.5, schedule=Iterative()
    )
    assert Magnitude.level == "sparsity" and Taylor.level == "sparsity"
    with pytest.raises(CompactMLError, match="pruning config"):
        prune(tiny(), WeightOnly(bits=4))


def test_zero_sparsity_keeps_everything():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned = prune(tiny(), Magnitude(0.0))
    assert get_mask(pruned[3]).all()


def test_digits_cnn_half_pruned_keeps_accuracy():
    model, task = examples.load("digits-cnn", progress=False)
    dense = cml.evaluate(model, task)["top1"]
    pruned = prune(model, Magnitude(0.5, scope="global"), task)
    assert sparsity(pruned).total == pytest.approx(0.5, abs=1e-4)
    assert cml.evaluate(pruned, task)["top1"] >= dense - 0.03
    # Per layer, the 9-weight filters of the first convolution suffer; one epoch recovers it.
    per_layer = fine_tune(prune(model, Magnitude(0.5), task), task, 1, 1e-3, progress=False)
    assert cml.evaluate(per_layer, task)["top1"] >= dense - 0.02
    assert MASK in per_layer.classifier.state_dict()
