"""cml.sensitivity: per-layer scans of any technique at several levels, the table and its curves."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compactml import examples
from compactml.config import Technique, history, record
from compactml.errors import CompactMLError
from compactml.evaluate import evaluate
from compactml.quantize import QAT, Dynamic, Half, Static, WeightOnly
from compactml.report.plots import sensitivity_png
from compactml.sensitivity import SensitivityTable, sensitivity
from compactml.task import Task

PNG = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass(frozen=True)
class ZeroSmallest(Technique):
    """A pruning-like technique for these tests: zero the ``sparsity`` fraction of smallest
    weights of each selected Linear layer; layers named in ``protect`` are skipped."""

    family = "prune"
    level = "sparsity"
    sparsity: float = 0.5
    protect: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.sparsity < 1:
            raise CompactMLError(f"sparsity must be in [0, 1), got {self.sparsity}; use e.g. 0.5")

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        new = self.copy_model(model)
        changed, skipped = [], {}
        for name, layer in self.targets(new, (nn.Linear,)):
            if name in self.protect:
                skipped[name] = "protected layer"
                continue
            k = int(self.sparsity * layer.weight.numel())
            if k:
                threshold = layer.weight.detach().abs().flatten().kthvalue(k).values
                with torch.no_grad():
                    layer.weight[layer.weight.abs() <= threshold] = 0.0
            changed.append(name)
        record(new, self, changed, skipped)
        return new


def crafted_model() -> nn.Sequential:
    """Layer "0" is harmless to compress: its weights are 0 or +-0.5 with exactly half zeros
    per row (exact at 2 bits per channel, and zeroing half of them changes nothing); layer
    "2" is random and suffers at 2 bits or half sparsity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    keep = torch.stack([torch.randperm(8) < 4 for _ in range(16)])
    signs = torch.where(torch.rand(16, 8) < 0.5, -0.5, 0.5)
    with torch.no_grad():
        model[0].weight.copy_(signs * keep)
    return model


def custom_task(model: nn.Module) -> Task:
    """A task whose metric is a custom callable: minus the squared error against the original
    model's outputs (higher is better, 0 at best)."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    target = model(x).detach()

    def neg_mse(m: nn.Module, task: Task) -> dict:
        with torch.no_grad():
            return {"neg_mse": -F.mse_loss(m(x), target).item()}

    return Task(metric=neg_mse, calib=[x[:32], x[32:]])


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert history(model) == []


def test_weight_only_on_digits_cnn(tmp_path):
    model, task = examples.load("digits-cnn", progress=False)
    before = snapshot(model)
    config = WeightOnly(bits=8, group_size=None)
    table = sensitivity(model, task, config, [8, 2], batches=2, progress=False)
    layers = ["features.conv1", "features.conv2", "features.conv3", "classifier"]
    assert table.layers == layers  # discovered from the technique's own record
    assert (table.technique, table.level_name, table.measure) == ("WeightOnly", "bits", "metric")
    assert table.metric == "top1" and table.higher_is_better and table.baseline > 0.9
    assert table.describe == "top1 drop on 2 eval batches" and not table.failures
    assert all(abs(table.damage(layer, 8)) <= 2 / 256 for layer in layers)
    assert max(table.damage(layer, 2) for layer in layers) > 0.02
    # A value is the metric with that one layer quantized, everything else untouched.
    alone = WeightOnly(bits=2, group_size=None, include=("features.conv1",)).apply(model)
    expected = evaluate(alone, task, limit=2, noise_levels=()).primary_value
    assert table.values["features.conv1"][2] == pytest.approx(expected)
    ranking = table.ranking(2)
    assert sorted(ranking) == sorted(layers)
    damages = [table.damage(layer, 2) for layer in ranking]
    assert damages == sorted(damages)
    data = table.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data and len(data["rows"]) == 8
    assert data["rows"][0] == {
        "layer": "features.conv1",
        "bits": 8,
        "top1": table.values["features.conv1"][8],
        "damage": table.damage("features.conv1", 8),
        "error": None,
    }
    path = table.plot(tmp_path / "curves.png")
    assert path.read_bytes().startswith(PNG)
    assert_untouched(model, before)


def test_custom_metric_harmless_and_harmful_layers():
    model = crafted_model()
    task = custom_task(model)
    before = snapshot(model)
    config = WeightOnly(bits=4, group_size=None)
    levels = np.array([8, 2])  # numpy levels become Python ints
    table = sensitivity(model, task, config, levels, measure="metric", progress=False)
    assert table.levels == (8, 2) and type(table.levels[0]) is int
    assert table.metric == "neg_mse" and table.baseline == 0.0
    assert table.layers == ["0", "2"]
    assert table.values["0"][2] == 0.0 and table.damage("0", 2) == 0.0  # exact at 2 bits
    assert table.damage("2", 2) > 1e-3 > table.damage("2", 8) >= 0
    assert table.ranking(2) == ["0", "2"]
    # "auto" with a custom metric uses the output error on calib batches.
    out = sensitivity(model, task, config, [8, 2], batches=2, progress=False)
    assert out.measure == "output" and out.metric == "output_error" and out.baseline == 0.0
    assert out.damage("0", 2) == 0.0 and out.damage("2", 2) > 0.01
    assert out.describe == "relative output error on 2 calib batches"
    assert_untouched(model, before)


def test_pruning_like_technique_is_measured_the_same_way():
    model = crafted_model()
    task = custom_task(model)
    before = snapshot(model)
    levels = [0.25, 0.5, 0.9]
    table = sensitivity(model, task, ZeroSmallest(), levels, measure="output", progress=False)
    assert (table.technique, table.level_name, table.layers) == (
        "ZeroSmallest",
        "sparsity",
        ["0", "2"],
    )
    assert table.damage("0", 0.25) == 0.0 and table.damage("0", 0.5) == 0.0  # only zeros removed
    assert table.damage("0", 0.9) > 0.01
    assert table.damage("2", 0.5) > table.damage("2", 0.25) > 0
    assert table.ranking(0.5) == ["0", "2"]
    # A function level -> Technique gives the same numbers.
    made = sensitivity(
        model, task, lambda s: ZeroSmallest(sparsity=s), levels, measure="output", progress=False
    )
    assert made.level_name == "level" and made.values == table.values
    assert_untouched(model, before)


def test_failures_are_recorded_not_fatal():
    model = crafted_model()
    task = custom_task(model)
    # Layer "0" has rows of 8 weights: no group of 16 fits, so WeightOnly refuses it (error).
    config = WeightOnly(bits=4, group_size=16)
    table = sensitivity(model, task, config, [4, 2], layers=["0", "2"], progress=False)
    assert set(table.failures) == {"0"} and set(table.failures["0"]) == {4, 2}
    assert "group" in table.failures["0"][2] and set(table.values["2"]) == {4, 2}
    assert table.values["0"] == {} and table.ranking(2) == ["2"]
    failed = [row for row in table.rows() if row["layer"] == "0"]
    assert all(row["output_error"] is None and row["error"] for row in failed)
    # A layer the technique records as skipped is a failure too, with its reason.
    guarded = ZeroSmallest(protect=("0",))
    skipped = sensitivity(model, task, guarded, [0.5], layers=["0", "2"], progress=False)
    assert skipped.failures == {"0": {0.5: "protected layer"}} and 0.5 in skipped.values["2"]
    # Discovery lists only the layers the technique changed on the whole model.
    with pytest.warns(UserWarning, match="kept 1 layer"):
        found = sensitivity(model, task, config, [4], progress=False)
    assert found.layers == ["2"]


def test_non_finite_values_are_ranked_last_and_kept_out_of_json():
    table = SensitivityTable(
        technique="T",
        level_name="bits",
        levels=(4,),
        measure="metric",
        metric="top1",
        higher_is_better=True,
        baseline=0.9,
        values={"a": {4: float("nan")}, "b": {4: 0.5}},
        failures={},
        describe="top1 drop on 1 eval batches",
    )
    assert table.ranking(4) == ["b", "a"] and table.damage("a", 4) == float("inf")
    row = table.rows()[0]
    assert row["top1"] is None and row["damage"] is None and "not finite" in row["error"]
    json.dumps(table.to_dict(), allow_nan=False)
    assert table.png().startswith(PNG)


def test_curves_chart_names_the_most_sensitive_layers():
    curves = {f"layer{i}": [(8, 0.9), (4, 0.9 - i / 100), (2, None)] for i in range(14)}
    png = sensitivity_png(curves, level_name="bits", metric_name="top1", baseline=0.9, top=3)
    assert png.startswith(PNG)


def test_level_fields_of_the_quantize_configs():
    assert WeightOnly.level == Static.level == Dynamic.level == "bits"
    assert QAT.level == "weight_bits" and Half.level is None
    for cls in (WeightOnly, Static, Dynamic, QAT):
        assert cls.level in {f.name for f in dataclasses.fields(cls)}


def test_bad_arguments():
    model = crafted_model()
    task = custom_task(model)
    config = WeightOnly(bits=4, group_size=None)
    before = snapshot(model)
    for levels in ([], (), "8", [True], [float("nan")], [4, 4], None):
        with pytest.raises(CompactMLError, match="levels must be"):
            sensitivity(model, task, config, levels, progress=False)
    with pytest.raises(CompactMLError, match="Half has no level to vary"):
        sensitivity(model, task, Half(), [16], progress=False)
    with pytest.raises(CompactMLError, match="technique must be a Technique"):
        sensitivity(model, task, "weight_only", [4], progress=False)
    with pytest.raises(CompactMLError, match="class WeightOnly; pass a config"):
        sensitivity(model, task, WeightOnly, [4], progress=False)
    with pytest.raises(CompactMLError, match="bits=9 is not valid"):
        sensitivity(model, task, config, [4, 9], progress=False)
    with pytest.raises(CompactMLError, match="returned int"):
        sensitivity(model, task, lambda level: level, [4], progress=False)
    with pytest.raises(CompactMLError, match="no module named 'nope'"):
        sensitivity(model, task, config, [4], layers=["nope"], progress=False)
    with pytest.raises(CompactMLError, match="layers must be"):
        sensitivity(model, task, config, [4], layers="0", progress=False)
    with pytest.raises(CompactMLError, match="measure='bogus'"):
        sensitivity(model, task, config, [4], measure="bogus", progress=False)
    with pytest.raises(CompactMLError, match="batches must be"):
        sensitivity(model, task, config, [4], batches=0, progress=False)
    with pytest.raises(CompactMLError, match="needs data"):
        sensitivity(model, None, config, [4], progress=False)
    table = sensitivity(model, task, config, [4], progress=False)
    with pytest.raises(CompactMLError, match="level 3 was not measured"):
        table.ranking(3)

    @dataclasses.dataclass(frozen=True)
    class Silent(ZeroSmallest):
        def apply(self, model, task=None):
            return self.copy_model(model)  # records nothing

    with pytest.raises(CompactMLError, match="did not record which layers"):
        sensitivity(model, task, Silent(), [0.5], progress=False)
    with pytest.raises(CompactMLError, match="changed no layer"):
        sensitivity(model, task, ZeroSmallest(include=("1",)), [0.5], progress=False)
    assert_untouched(model, before)


def test_static_measures_weight_layers_only():
    """Static also folds BatchNorms and wraps ReLUs; those are not layers to measure alone."""
    model, task = examples.load("digits-cnn", progress=False)
    table = sensitivity(model, task, Static(progress=False), [8], batches=1, progress=False)
    assert table.layers == ["features.conv1", "features.conv2", "features.conv3", "classifier"]
    assert not table.failures
