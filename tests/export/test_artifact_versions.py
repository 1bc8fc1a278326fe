"""Artifacts of format version 1 (every tensor under its own name, a plain JSON manifest,
``replace`` transforms only) still load, bit-exact and with their signatures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compactml.export.artifact import artifact_bytes, load, read_manifest, save
from compactml.export.encodings import encode
from compactml.export.manifest import MANIFEST_KEY, header_digest, manifest_text, stored_manifest
from compactml.export.modules import describe_module
from compactml.export.packing import PACKED_NAME
from compactml.export.tensors import serialize, stored_tensors, tensor_sha256

DATA = Path(__file__).parent / "data"


def build_v1_fixture_model() -> nn.Module:
    """The model in ``data/v1_signed.cml``, written by compactml at format version 1 (commit
    95b1bbd) with metrics and an ed25519 key whose public half is ``data/v1_signed.pub``: a
    90%-sparse layer with its mask buffer (sparse and bits encodings), tied weights (an alias).
    Built from integer arithmetic, so it is the same model on every machine."""
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU())
    net.append(nn.Linear(8, 8, bias=False))
    net[4].weight = net[2].weight
    with torch.no_grad():
        w = (torch.arange(128, dtype=torch.float32).reshape(8, 16) - 60) / 16
        w[(torch.arange(128).reshape(8, 16) % 10) != 0] = 0
        net[0].weight.copy_(w)
        net[0].bias.copy_(torch.arange(8, dtype=torch.float32) / 4 - 1)
        net[2].weight.copy_((torch.arange(64, dtype=torch.float32).reshape(8, 8) % 7 - 3) / 8)
    net[0].register_buffer("weight_mask", w != 0)
    return net.eval()


def test_a_file_written_by_format_version_1_loads_verified_and_bit_exact(tmp_path):
    path, key = DATA / "v1_signed.cml", DATA / "v1_signed.pub"
    manifest = read_manifest(path, verify_key=key)
    assert manifest["format_version"] == 1
    assert set(manifest["encodings"]) == {"0.weight", "0.weight_mask", "2.weight"}
    assert manifest["aliases"] == {"4.weight": "2.weight"}
    expected = build_v1_fixture_model()
    loaded = load(path, verify_key=key, model=build_v1_fixture_model())
    assert loaded[4].weight is loaded[2].weight
    state = loaded.state_dict()
    for name, tensor in expected.state_dict().items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    x = torch.linspace(-2, 2, 48).reshape(3, 16)
    assert torch.equal(loaded(x), expected(x))
    # Saved again, it is written at the current version, and reads back the same.
    again = load(save(loaded, tmp_path / "v2.cml"), model=build_v1_fixture_model())
    assert read_manifest(tmp_path / "v2.cml")["format_version"] == 2
    assert torch.equal(again(x), expected(x))


def v1_bytes(model: nn.Module) -> bytes:
    """``model`` written as format version 1 wrote it: tensors unpacked, the manifest as plain
    JSON, every changed module as a ``replace`` transform with its full description."""
    data = artifact_bytes(model)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    manifest = json.loads(stored_manifest(header["__metadata__"], "v2"))
    transforms = [
        {"op": "replace", "module": op["module"]}
        | {"spec": describe_module(op["module"], model.get_submodule(op["module"]))}
        if op["op"] == "convert"
        else op
        for op in manifest["transforms"]
    ]
    tensors, _ = stored_tensors(model)
    tensors, encodings = encode(tensors)
    manifest |= {"format_version": 1, "transforms": transforms, "encodings": encodings}
    manifest["tensor_sha256"] = tensor_sha256(tensors)
    metadata = {MANIFEST_KEY: manifest_text(manifest)}
    return serialize(tensors, metadata | {"compactml.header_sha256": header_digest(metadata)})


def test_a_version_1_file_with_structural_changes_loads(net, image, perturb, tmp_path):
    net.conv = nn.Conv2d(1, 2, 3, padding=1)
    net.bn = nn.BatchNorm2d(2)
    net.fc1 = nn.Linear(2, 8)
    perturb(net, seed=4)
    path = tmp_path / "v1.cml"
    path.write_bytes(v1_bytes(net))
    header = path.read_bytes()[: 8 + int.from_bytes(path.read_bytes()[:8], "little")]
    assert PACKED_NAME.encode() not in header and b'"op\\":\\"replace' in header
    manifest = read_manifest(path)
    assert manifest["format_version"] == 1
    assert {op["op"] for op in manifest["transforms"]} == {"replace"}
    loaded = load(path, trust_factory=True)
    assert loaded.conv.out_channels == 2 and loaded.fc1.in_features == 2
    assert torch.equal(loaded(image), net(image))
