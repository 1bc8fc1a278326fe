"""Hand-edited headers whose digest was recomputed: refused with a clear ArtifactError.

The header digest is not keyed, so anyone can edit a manifest and fix the digest. Such a file
must still never crash the loader with a raw Python error, allocate absurd amounts of memory,
or shadow a method of a module.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors  # safetensors: no pickle involved
from torch import nn

import compactml.source
from compactml.errors import ArtifactError, CompactMLError
from compactml.export.artifact import load, read_manifest, save
from compactml.export.manifest import COMPRESSED_MANIFEST_KEY, compress_manifest, stored_manifest
from compactml.source import load_factory


def rewrite_header(path: Path, edit: Callable[[dict[str, str]], None]) -> Path:
    """Apply ``edit`` to the header metadata of artifact ``path`` and recompute its digest
    (SHA-256 over the canonical JSON of every other entry), as a careful hand edit would."""
    data = path.read_bytes()
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    edit(metadata)
    metadata.pop("compactml.header_sha256", None)
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    metadata["compactml.header_sha256"] = hashlib.sha256(text.encode("ascii")).hexdigest()
    path.write_bytes(safetensors.torch.save(load_safetensors(data), metadata=metadata))
    return path


def rewrite_manifest(path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Apply ``edit`` to the manifest of artifact ``path`` (kept compressed when it was); the
    header digest is recomputed."""

    def edit_metadata(metadata: dict[str, str]) -> None:
        manifest = json.loads(stored_manifest(metadata, str(path)))
        edit(manifest)
        text = json.dumps(manifest, sort_keys=True)
        if COMPRESSED_MANIFEST_KEY in metadata:
            metadata[COMPRESSED_MANIFEST_KEY] = compress_manifest(text)
        else:
            metadata["compactml.manifest"] = text

    return rewrite_header(path, edit_metadata)


@pytest.fixture
def saved(net, tmp_path) -> Path:
    """``net`` saved unsigned."""
    return save(net, tmp_path / "net.cml")


def test_rewrite_helper_keeps_a_loadable_file(saved, net, image):
    rewrite_manifest(saved, lambda m: m["metrics"] is None)  # no change, fresh digest
    assert torch.equal(load(saved, trust_factory=True)(image), net(image))
    rewrite_manifest(saved, lambda m: m.update(metrics={"accuracy": 0.5}))
    assert read_manifest(saved)["metrics"] == {"accuracy": 0.5}  # the digest really is recomputed


def transform(op: str, module: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    """An edit appending one transform to the manifest."""
    return lambda m: m["transforms"].append({"op": op, "module": module, **fields})


def linear(in_features: int, out_features: int) -> dict[str, Any]:
    """The spec of a Linear layer with a bias."""
    args = {"in_features": in_features, "out_features": out_features, "bias": True}
    return {"type": "Linear", "args": args}


def add_buffer(shape: list[int]) -> Callable[[dict[str, Any]], None]:
    """An edit adding a float buffer ``fc1.extra`` of ``shape``."""
    fields = {"name": "extra", "kind": "buffer", "dtype": "float32", "requires_grad": False}
    return transform("add_tensor", "fc1", shape=shape, **fields)


CRAFTED = {
    "negative shape": (add_buffer([-1]), "transform 0 is invalid"),
    "shape overflowing int64": (add_buffer([2**40, 2**40]), "RuntimeError"),
    # 64 GiB if it were allocated: it is a placeholder on the meta device, refused as a misfit.
    "huge shape": (add_buffer([2**17, 2**17]), r"missing fc1\.extra"),
    "negative in_features": (
        transform("replace", "fc1", spec=linear(-4, 8)),
        "cannot rebuild.*RuntimeError",
    ),
    # 16 GiB if it were built: refused on the meta device before anything is allocated.
    "huge layer": (transform("replace", "fc1", spec=linear(2**16, 2**16)), "would hold"),
    "set a method": (
        transform("set", "fc1", attr="forward", value="x", tuple=False),
        "'forward' of 'fc1' cannot be set",
    ),
    "set a private attribute": (
        transform("set", "fc1", attr="__class__", value="x", tuple=False),
        "transform 0 is invalid",
    ),
    "missing transform field": (transform("delete", "act"), "transform 0 is invalid"),
    "boolean where a bool is not expected": (
        transform("remove_tensor", "fc1", name=True, none=False),
        "transform 0 is invalid",
    ),
    "unknown transform": (transform("explode", ""), "newer compactml.*'explode'"),
    "convert of a module without a description": (
        transform("convert", "mixer", spec=linear(8, 8)),
        "cannot rebuild.*'mixer' cannot be converted",
    ),
    "convert to a huge layer": (
        transform("convert", "fc1", spec=linear(2**16, 2**16)),
        "would hold",
    ),
    "convert with an argument the type lacks": (
        transform("convert", "fc1", spec={"type": "Linear", "args": {"kernel_size": 3}}),
        "cannot rebuild.*unknown arguments",
    ),
    "packed tensor past the blob": (
        lambda m: m["encodings"]["fc1.bias"].update(shape=[9]),
        "damaged.*packed tensors run past the end",
    ),
    "packed tensor of another dtype": (
        lambda m: m["encodings"]["fc1.bias"].update(dtype="float16"),
        "damaged.*::packed holds",
    ),
    "builtin source without name": (
        lambda m: m.update(source={"kind": "builtin"}),
        "builtin source's 'name'",
    ),
    "factory source without path": (
        lambda m: m.update(source={"kind": "factory", "spec": "a.py:f", "sha256": "0" * 64}),
        "factory source's 'path'",
    ),
    "source without kind": (lambda m: m.update(source={"name": "x"}), "source has no kind"),
    "unknown source kind": (lambda m: m.update(source={"kind": "s3"}), "newer compactml.*'s3'"),
    "format_version true": (lambda m: m.update(format_version=True), "format version True"),
    "format_version 0": (lambda m: m.update(format_version=0), "format version 0"),
    "format_version text": (lambda m: m.update(format_version="1"), "format version 1 is not"),
    "newer format_version": (lambda m: m.update(format_version=3), "newer compactml"),
    "unknown manifest field": (lambda m: m.update(extra=1), "newer compactml.*'extra'"),
    "missing manifest field": (lambda m: m.pop("aliases"), "'aliases' is missing"),
    "alias to a number": (lambda m: m.update(aliases={"fc1.bias": 5}), "alias"),
    "alias to nothing": (lambda m: m.update(aliases={"fc1.x": "nope"}), "names no stored"),
    "short tensor digest": (lambda m: m.update(tensor_sha256="abc"), "not a SHA-256"),
}


@pytest.mark.parametrize("case", CRAFTED, ids=list(CRAFTED))
def test_crafted_manifest_is_refused_with_a_clear_error(saved, case):
    edit, message = CRAFTED[case]
    rewrite_manifest(saved, edit)
    with pytest.raises(CompactMLError, match=message) as caught:
        load(saved, trust_factory=True)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "case", ["format_version true", "newer format_version", "unknown source kind"]
)
def test_crafted_manifest_is_refused_by_read_manifest_too(saved, case):
    rewrite_manifest(saved, CRAFTED[case][0])
    with pytest.raises(ArtifactError, match=CRAFTED[case][1]):
        read_manifest(saved)


def test_newer_format_asks_for_an_upgrade(saved):
    rewrite_manifest(saved, lambda m: m.update(format_version=7))
    with pytest.raises(ArtifactError, match="written by a newer compactml.*upgrade compactml"):
        load(saved, trust_factory=True)


def test_hf_source_with_bad_config_is_an_artifact_error(saved):
    pytest.importorskip("transformers")
    config = {"model_type": "bert", "hidden_size": -1, "num_attention_heads": 1}
    config |= {"num_hidden_layers": 1, "intermediate_size": 4, "vocab_size": 10}
    source = {"kind": "hf", "path": "nowhere", "class": "BertModel", "config": config}
    rewrite_manifest(saved, lambda m: m.update(source=source))
    with pytest.raises(
        ArtifactError, match="cannot rebuild the architecture of " + re.escape(str(saved))
    ) as caught:
        load(saved)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("compactml.future_entry", "written by a newer compactml.*'compactml.future_entry'"),
        ("author", "damaged.*unexpected header entry 'author'"),
    ],
)
def test_unknown_header_entries(saved, key, message):
    rewrite_header(saved, lambda metadata: metadata.update({key: "x"}))
    with pytest.raises(ArtifactError, match=message):
        load(saved, trust_factory=True)


def test_header_entry_formats_are_checked_without_a_key(saved):
    entries = {"compactml.signature": "AB" * 64, "compactml.key_id": "0" * 16}
    rewrite_header(saved, lambda metadata: metadata.update(entries))
    with pytest.raises(ArtifactError, match="compactml.signature is not"):
        load(saved, trust_factory=True)
    entries = {"compactml.signature": "ab" * 64, "compactml.key_id": "0" * 15 + "g"}
    rewrite_header(saved, lambda metadata: metadata.update(entries))
    with pytest.raises(ArtifactError, match="compactml.key_id is not"):
        load(saved, trust_factory=True)
    rewrite_header(saved, lambda metadata: metadata.pop("compactml.key_id"))
    with pytest.raises(ArtifactError, match="needs both"):
        load(saved, trust_factory=True)


def test_missing_or_wrong_header_digest_is_damage(saved):
    data = saved.read_bytes()
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    tensors = load_safetensors(data)
    del metadata["compactml.header_sha256"]
    saved.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    with pytest.raises(ArtifactError, match="no compactml.header_sha256"):
        load(saved, trust_factory=True)
    metadata["compactml.header_sha256"] = "0" * 64
    saved.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    with pytest.raises(ArtifactError, match="does not match its SHA-256"):
        load(saved, trust_factory=True)


def test_untrusted_factory_source_is_never_run(saved, net, image, monkeypatch):
    ran = []
    monkeypatch.setattr(compactml.source, "load_factory", lambda spec: ran.append(spec))
    with pytest.raises(CompactMLError, match="trust_factory"):
        load(saved)
    loaded = load(saved, model=type(net)())
    assert torch.equal(loaded(image), net(image))
    with pytest.raises(CompactMLError, match="cannot save.*trust_factory=True"):
        save(loaded, saved.with_name("again.cml"))
    assert ran == [] and not saved.with_name("again.cml").exists()


def test_trusted_load_can_be_saved_again(saved, net, image, tmp_path):
    loaded = load(saved, trust_factory=True)
    loaded.act = nn.Identity()
    again = load(save(loaded, tmp_path / "again.cml"), trust_factory=True)
    assert isinstance(again.act, nn.Identity)
    assert torch.equal(again(image), loaded(image))


def test_skeleton_built_by_the_factory_can_be_saved_again(saved, factory_file, image, tmp_path):
    skeleton, _ = load_factory(f"{factory_file}:build")  # the caller ran the factory itself
    loaded = load(saved, model=skeleton)
    again = load(save(loaded, tmp_path / "again.cml"), trust_factory=True)
    assert torch.equal(again(image), loaded(image))
    # A model from an untrusted load passed back as skeleton stays untrusted.
    untrusted = load(saved, model=load(saved, model=type(skeleton)()))
    with pytest.raises(CompactMLError, match="cannot save.*trust_factory=True"):
        save(untrusted, tmp_path / "third.cml")
