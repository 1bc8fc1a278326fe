"""Saving and loading .cml artifacts: round trips, file handling, refusals."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from compactml.errors import ArtifactError, CompactMLError
from compactml.export.artifact import (
    artifact_bytes,
    load,
    read_manifest,
    save,
    tensor_sha256,
)
from compactml.export.manifest import stored_manifest
from compactml.export.packing import PACKED_NAME, pack
from compactml.source import get_path, get_source, load_factory


def test_factory_model_round_trips_bit_exact(net, image, tmp_path):
    path = save(net, tmp_path / "net.cml")
    loaded = load(path, trust_factory=True)
    assert torch.equal(loaded(image), net(image))
    assert type(loaded).__qualname__ == "Net"
    assert not loaded.training
    assert get_source(loaded) == get_source(net)
    assert get_path(loaded) == str(path.resolve())
    assert read_manifest(path)["transforms"] == []


def test_file_is_safetensors_with_manifest(net, tmp_path):
    net.fc2 = nn.Linear(8, 300)  # big enough to be stored on its own
    path = save(net, tmp_path / "net.cml", metrics={"accuracy": 0.75, "n": np.int64(3)})
    state = net.state_dict()
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        assert set(handle.keys()) == {"fc2.weight", PACKED_NAME}  # the rest are small
        assert torch.equal(handle.get_tensor("fc2.weight"), state["fc2.weight"])
    manifest = json.loads(stored_manifest(metadata, "net.cml"))
    assert set(manifest["encodings"]) == set(state) - {"fc2.weight"}
    assert manifest["format"] == "compactml.artifact"
    assert manifest["format_version"] == 2
    assert manifest["tool_version"] == "0.1.0"
    assert manifest["source"] == get_source(net)
    assert manifest["metrics"] == {"accuracy": 0.75, "n": 3}
    assert manifest["history"] == [] and manifest["aliases"] == {}
    stored, _ = pack(state)
    assert manifest["tensor_sha256"] == tensor_sha256(stored)
    assert read_manifest(path) == manifest


def test_artifact_bytes_is_deterministic_and_matches_file_size(net, tmp_path):
    data = artifact_bytes(net)
    assert artifact_bytes(net) == data
    path = save(net, tmp_path / "net.cml")
    assert len(data) == os.path.getsize(path)
    assert path.read_bytes() == data


def test_structurally_shrunk_model_round_trips(perturb, net, image, tmp_path):
    net.conv = nn.Conv2d(1, 2, 3, padding=1)
    net.bn = nn.BatchNorm2d(2)
    net.act = nn.Identity()
    net.fc1 = nn.Linear(2, 8)
    net.fc2 = nn.Linear(8, 3, bias=False)
    perturb(net, seed=5)
    path = save(net, tmp_path / "small.cml")
    transforms = read_manifest(path)["transforms"]
    assert [t["module"] for t in transforms] == ["conv", "bn", "act", "fc1", "fc2"]
    # A layer of the same kind records only the arguments that changed; ReLU -> Identity all.
    changes = {t["module"]: (t["op"], t["spec"]["args"]) for t in transforms}
    assert changes == {
        "conv": ("convert", {"out_channels": 2}),
        "bn": ("convert", {"num_features": 2}),
        "act": ("replace", {}),
        "fc1": ("convert", {"in_features": 2}),
        "fc2": ("convert", {"bias": False}),
    }
    loaded = load(path, trust_factory=True)
    assert loaded.conv.out_channels == 2 and loaded.fc1.in_features == 2
    assert isinstance(loaded.act, nn.Identity) and loaded.fc2.bias is None
    assert torch.equal(loaded(image), net(image))
    # A skeleton that already has the saved architecture is filled as it is.
    skeleton = perturb(copy.deepcopy(net), seed=9)
    assert not torch.equal(skeleton(image), net(image))
    assert torch.equal(load(path, model=skeleton)(image), net(image))


def test_plain_attribute_change_round_trips(net, image, tmp_path):
    net.mixer.heads = 2  # forward reshapes by heads: a wrong value changes the output
    loaded = load(save(net, tmp_path / "heads.cml"), trust_factory=True)
    assert loaded.mixer.heads == 2
    assert torch.equal(loaded(image), net(image))


def test_container_replacement_and_deletion_round_trip(perturb, factory_file, tmp_path):
    seq, _ = load_factory(f"{factory_file}:build_seq")
    del seq[2]  # Sequential renumbers: Linear, ReLU, Linear
    seq[0] = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 5))
    perturb(seq)
    loaded = load(save(seq, tmp_path / "seq.cml"), trust_factory=True)
    assert [type(m).__name__ for m in loaded] == ["Sequential", "ReLU", "Linear"]
    assert len(loaded[0]) == 3
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), seq(x))


def test_model_without_source_needs_a_skeleton(perturb, tmp_path):
    torch.manual_seed(0)
    model = perturb(nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)))
    path = save(model, tmp_path / "plain.cml")
    with pytest.raises(CompactMLError, match="model="):
        load(path)
    skeleton = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    loaded = load(path, model=skeleton)
    x = torch.randn(3, 5)
    assert loaded is skeleton
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(CompactMLError, match="do not fit"):
        load(path, model=nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)))


def test_tied_weights_are_stored_once_and_retied(perturb, tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.dec = nn.Linear(4, 10, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, ids):
            return self.dec(self.emb(ids))

    model = perturb(Tied())
    path = save(model, tmp_path / "tied.cml")
    assert read_manifest(path)["aliases"] == {"dec.weight": "emb.weight"}
    with safe_open(str(path), "pt") as handle:
        assert list(handle.keys()) == ["emb.weight"]
    loaded = load(path, model=Tied())
    assert loaded.dec.weight is loaded.emb.weight
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model(ids))


def test_dtypes_are_kept(net, image, tmp_path):
    net.half()
    net.register_buffer("scale", torch.tensor([1.5, 2.0], dtype=torch.bfloat16))
    loaded = load(save(net, tmp_path / "half.cml"), trust_factory=True)
    assert loaded.fc1.weight.dtype == torch.float16
    assert loaded.scale.dtype == torch.bfloat16
    assert torch.equal(loaded.scale, net.scale)
    for name, tensor in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_added_and_removed_tensors_round_trip(net, image, tmp_path):
    net.mixer.register_buffer("mask", torch.tensor([True, False] * 4))
    net.mixer.offset = None
    path = save(net, tmp_path / "tensors.cml")
    ops = {(t["op"], t["module"]) for t in read_manifest(path)["transforms"]}
    assert ops == {("add_tensor", "mixer"), ("remove_tensor", "mixer")}
    loaded = load(path, trust_factory=True)
    assert torch.equal(loaded.mixer.mask, net.mixer.mask) and loaded.mixer.mask.dtype == torch.bool
    assert loaded.mixer.offset is None and "mixer.offset" not in loaded.state_dict()
    assert torch.equal(loaded(image), net(image))


def test_unsupported_changed_module_is_refused(net, tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 8)

        def forward(self, x):
            return 2 * self.inner(x)

    net.fc1 = Scaled()
    with pytest.raises(CompactMLError, match="'fc1' of type Scaled"):
        save(net, tmp_path / "bad.cml")
    assert not (tmp_path / "bad.cml").exists()


def test_refuses_to_overwrite_the_loaded_file(net, tmp_path):
    path = save(net, tmp_path / "net.cml")
    before = path.read_bytes()
    loaded = load(path, trust_factory=True)
    loaded.fc2.weight.data.zero_()
    with pytest.raises(CompactMLError, match="input file"):
        save(loaded, path)
    with pytest.raises(CompactMLError, match="input file"):
        save(net, tmp_path / "net.py")  # the factory file the model was built from
    assert path.read_bytes() == before
    save(loaded, tmp_path / "other.cml")  # any other path is fine


def test_nan_weight_is_refused_and_nothing_written(net, tmp_path):
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    with pytest.raises(CompactMLError, match="fc1.weight"):
        save(net, tmp_path / "nan.cml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.py"]


def test_failed_write_leaves_no_temporary_file(net, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.cml").write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CompactMLError, match="cannot write"):
        save(net, out / "model.cml")
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == ["model.cml"]
    assert (out / "model.cml").read_bytes() == b"old"


def test_bad_paths_give_clear_errors(net, tmp_path):
    with pytest.raises(CompactMLError, match="does not exist; check the path"):
        load(tmp_path / "missing.cml")
    with pytest.raises(CompactMLError, match="is a directory"):
        load(tmp_path)
    (tmp_path / "notes.cml").write_text("just some text, not a model")
    with pytest.raises(ArtifactError, match="not a compactml artifact"):
        load(tmp_path / "notes.cml")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.cml"))
    with pytest.raises(ArtifactError, match="not a compactml artifact"):
        load(tmp_path / "plain.cml")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_gives_clear_error(net, tmp_path):
    path = save(net, tmp_path / "net.cml")
    path.chmod(0)
    try:
        with pytest.raises(CompactMLError, match="cannot read"):
            load(path)
    finally:
        path.chmod(0o644)


def test_truncated_file_is_refused(net, tmp_path):
    data = artifact_bytes(net)
    header = int.from_bytes(data[:8], "little")
    for length in (0, 5, 8, 9, header // 2, header + 8, len(data) - 4, len(data) - 1):
        path = tmp_path / f"cut{length}.cml"
        path.write_bytes(data[:length])
        with pytest.raises(ArtifactError, match="not a compactml artifact or is truncated"):
            load(path)


def test_metrics_must_be_json(net, tmp_path):
    with pytest.raises(CompactMLError, match="metrics"):
        artifact_bytes(net, metrics={"bad": object()})
    with pytest.raises(CompactMLError, match="metrics"):
        save(net, tmp_path / "m.cml", metrics={"loss": float("nan")})
    assert not (tmp_path / "m.cml").exists()
