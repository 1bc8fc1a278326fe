"""The module-spec table and the transforms that rebuild a changed module tree."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.export import modules
from compactml.export.artifact import load, read_manifest, save
from compactml.export.modules import MODULE_TYPES, SpecLayer, build_module, describe_module
from compactml.export.planning import plan_transforms
from compactml.export.transforms import apply_transforms

CUSTOM_LAYER = textwrap.dedent(
    """
    import torch
    from torch import nn


    class ScaledLinear(nn.Module):
        def __init__(self, in_features, out_features, scale):
            super().__init__()
            self.scale = scale
            self.inner = nn.Linear(in_features, out_features)
            self.register_buffer("gain", torch.ones(out_features))

        def forward(self, x):
            return self.inner(x) * self.gain * self.scale

        def compactml_spec(self):
            return {"in_features": self.inner.in_features,
                    "out_features": self.inner.out_features, "scale": self.scale}

        @classmethod
        def from_compactml_spec(cls, args):
            return cls(**args)
    """
)


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(3, 2, bias=False),
        nn.Conv1d(2, 4, 3, stride=2, groups=2),
        nn.Conv2d(3, 6, (3, 1), padding="same", dilation=2, padding_mode="reflect"),
        nn.BatchNorm1d(5, eps=1e-3, momentum=None, affine=False),
        nn.LayerNorm((4, 6), elementwise_affine=True, bias=False),
        nn.GroupNorm(2, 4),
        nn.Embedding(10, 3, padding_idx=0, max_norm=1.5),
        nn.MaxPool2d(3, stride=1, ceil_mode=True),
        nn.AvgPool2d(2, divisor_override=3),
        nn.GELU(approximate="tanh"),
        nn.Dropout(0.25),
        nn.Flatten(0, -1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_table_rebuilds_modules_with_their_arguments(module):
    spec = describe_module("layer", module)
    rebuilt = build_module(spec)
    assert type(rebuilt) is type(module)
    assert repr(rebuilt) == repr(module)
    assert describe_module("layer", rebuilt) == spec
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: tuple(v.shape) for k, v in module.state_dict().items()
    }


def test_plan_and_apply_give_the_same_tree():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    model = nn.Sequential(nn.Linear(4, 3), nn.Identity(), nn.Linear(3, 2))
    model.add_module("extra", nn.Sequential(nn.Tanh()))
    fresh = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    transforms = plan_transforms(model, base)
    rebuilt = apply_transforms(fresh, transforms)
    assert repr(rebuilt) == repr(model)
    # Applying again changes nothing: a skeleton may already have the final structure.
    assert repr(apply_transforms(rebuilt, transforms)) == repr(model)


def test_unknown_transform_is_a_clear_load_error(tmp_path):
    with pytest.raises(ValueError, match="unknown transform"):
        apply_transforms(nn.Linear(2, 2), [{"op": "explode", "module": ""}])
    with pytest.raises(ValueError, match="does not exist"):
        apply_transforms(
            nn.Sequential(),
            [{"op": "set", "module": "a", "attr": "x", "value": 1, "tuple": False}],
        )
    with pytest.raises(ValueError, match="cannot be set"):
        apply_transforms(
            nn.Linear(2, 2),
            [{"op": "set", "module": "", "attr": "weight", "value": 1, "tuple": False}],
        )


def test_self_describing_layer_round_trips(net, image, tmp_path, monkeypatch, perturb):
    (tmp_path / "cml_test_layers.py").write_text(CUSTOM_LAYER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cml_test_layers", raising=False)
    layer_cls = importlib.import_module("cml_test_layers").ScaledLinear
    monkeypatch.setitem(MODULE_TYPES, "ScaledLinear", SpecLayer("cml_test_layers:ScaledLinear"))
    net.fc1 = layer_cls(4, 8, 0.5)
    perturb(net, seed=6)
    path = save(net, tmp_path / "custom.cml")
    transforms = read_manifest(path)["transforms"]
    assert transforms == [
        {
            "op": "replace",
            "module": "fc1",
            "spec": {
                "type": "ScaledLinear",
                "args": {"in_features": 4, "out_features": 8, "scale": 0.5},
            },
        }
    ]
    loaded = load(path, trust_factory=True)
    assert type(loaded.fc1) is layer_cls
    assert torch.equal(loaded(image), net(image))
    monkeypatch.delitem(modules.MODULE_TYPES, "ScaledLinear")
    with pytest.raises(CompactMLError, match="'ScaledLinear'.*upgrade compactml"):
        load(path, trust_factory=True)
    with pytest.raises(CompactMLError, match="'fc1' of type ScaledLinear"):
        save(net, tmp_path / "again.cml")


def test_changed_factory_file_is_reported(net, image, factory_file, tmp_path):
    path = save(net, tmp_path / "net.cml")
    factory_file.write_text(factory_file.read_text() + "\n# edited\n")
    with pytest.raises(CompactMLError, match="changed since"):
        load(path, trust_factory=True)
    with pytest.raises(CompactMLError, match="cannot save"):
        save(net, tmp_path / "again.cml")
    skeleton = load(path, model=type(net)())
    assert torch.equal(skeleton(image), net(image))


def test_spec_layer_from_an_importable_module_round_trips(net, image, tmp_path, monkeypatch):
    """A layer registered as SpecLayer("module:Class") is described by its own spec, rebuilt
    with from_compactml_spec, and filled bit-exact (mask and scale included)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.delitem(sys.modules, "spec_layer_fixture", raising=False)
    layer_cls = importlib.import_module("spec_layer_fixture").MaskedLinear
    monkeypatch.setitem(MODULE_TYPES, "MaskedLinear", SpecLayer("spec_layer_fixture:MaskedLinear"))
    net.fc2 = layer_cls(8, 3, 0.25)
    with torch.no_grad():
        net.fc2.weight.copy_(torch.randn(3, 8, generator=torch.Generator().manual_seed(7)))
        net.fc2.mask.copy_(torch.tensor([[True, False, True, True, False, True, False, True]] * 3))
    assert not net.fc2.mask.all()  # a default (all-ones) mask would change the output
    path = save(net, tmp_path / "masked.cml")
    spec = {"type": "MaskedLinear", "args": {"in_features": 8, "out_features": 3, "scale": 0.25}}
    assert read_manifest(path)["transforms"] == [{"op": "replace", "module": "fc2", "spec": spec}]
    loaded = load(path, trust_factory=True)
    assert type(loaded.fc2) is layer_cls and loaded.fc2.scale == 0.25
    assert torch.equal(loaded.fc2.mask, net.fc2.mask) and loaded.fc2.mask.dtype == torch.bool
    assert torch.equal(loaded(image), net(image))
