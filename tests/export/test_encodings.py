"""Sparse and boolean tensors are stored as bitmask + values, bit-exactly and compactly."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import compactml as cml
from compactml.errors import ArtifactError
from compactml.export.encodings import MASK_SUFFIX, VALUES_SUFFIX, decode, encode


def _sparse(shape: tuple[int, ...], density: float, dtype=torch.float32, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=gen).to(dtype)
    keep = torch.rand(shape, generator=gen) < density
    return torch.where(keep, values, torch.zeros((), dtype=dtype))


def test_round_trip_is_exact_for_every_kind():
    tensors = {
        "w": _sparse((32, 16), 0.1),
        "half": _sparse((8, 64), 0.05, torch.float16),
        "codes": torch.full((40, 40), 128, dtype=torch.uint8),
        "mask": _sparse((32, 16), 0.1) != 0,
        "dense": torch.randn(20, 20),
        "tiny": torch.zeros(3),
    }
    tensors["codes"][3, 5] = 7
    tensors["codes"][39, 39] = 255
    stored, encodings = encode(tensors)
    assert set(encodings) == {"w", "half", "codes", "mask"}
    assert "dense" in stored and "tiny" in stored  # dense and tiny tensors stay as they are
    assert encodings["codes"]["fill"] == 128
    assert stored["codes" + VALUES_SUFFIX].tolist() == [7, 255]
    decoded = decode(stored, encodings)
    assert set(decoded) == set(tensors)
    for name, tensor in tensors.items():
        assert decoded[name].dtype == tensor.dtype
        assert torch.equal(decoded[name], tensor), name


def test_nan_and_negative_fill_bits_survive():
    tensor = torch.zeros(256, dtype=torch.float32)
    tensor[3] = float("nan")
    tensor[9] = -2.5
    codes = torch.full((100,), -1, dtype=torch.int16)  # not byte-wide: fill is zero, no saving
    stored, encodings = encode({"t": tensor, "c": codes})
    assert "c" in stored and "c" not in encodings
    out = decode(stored, encodings)["t"]
    assert torch.isnan(out[3]) and out[9] == -2.5 and int((out != 0).sum()) == 2


def test_a_weight_and_its_mask_share_one_bitmask():
    weight = _sparse((64, 32), 0.2)
    stored, encodings = encode({"fc.weight": weight, "fc.weight_mask": weight != 0})
    masks = [name for name in stored if name.endswith(MASK_SUFFIX)]
    assert len(masks) == 1
    assert encodings["fc.weight"]["mask"] == encodings["fc.weight_mask"]["mask"]


def test_dense_tensors_are_never_made_bigger():
    weight = _sparse((64, 64), 0.95)  # 5% zeros: bitmask + values would be larger
    stored, encodings = encode({"w": weight})
    assert encodings == {} and stored["w"] is weight


@pytest.mark.parametrize(
    "doctor",
    [
        lambda s, e: e["w"].update(shape=[64, 64]),  # more elements than the bitmask has bits
        lambda s, e: e["w"].update(kind="zip"),
        lambda s, e: e["w"].update(dtype="complex128"),
        lambda s, e: e["w"].update(fill=2**40),
        lambda s, e: e["w"].update(extra=1),
        lambda s, e: s.update({"w::values": s["w::values"][:-1]}),
        lambda s, e: s.pop("w::mask"),
        lambda s, e: s.update({"orphan::values": torch.zeros(2)}),
    ],
)
def test_inconsistent_encodings_are_refused(doctor):
    stored, encodings = encode({"w": _sparse((32, 16), 0.1)})
    doctor(stored, encodings)
    with pytest.raises(ValueError):
        decode(stored, encodings)


def _pruned_net(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    for layer in (net[0], net[2]):
        w = layer.weight.data
        keep = w.abs() > w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
        layer.weight.data = torch.where(keep, w, torch.zeros(()))
        layer.register_buffer("weight_mask", keep)
    return net


def test_a_90_percent_sparse_artifact_is_small_and_loads_exactly(tmp_path):
    net = _pruned_net(0.9)
    dense = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    cml.save(net, tmp_path / "sparse.cml")
    dense_bytes = sum(p.numel() * 4 for p in dense.parameters())
    ratio = dense_bytes / os.path.getsize(tmp_path / "sparse.cml")
    assert ratio > 5, ratio  # float values: 1 bit + 10% of 32 bits per weight
    loaded = cml.load(tmp_path / "sparse.cml", model=_pruned_net(0.5))  # same architecture
    x = torch.randn(4, 256)
    assert torch.equal(loaded(x), net(x))
    assert torch.equal(loaded[0].weight_mask, net[0].weight_mask)


def test_a_doctored_encoding_is_a_damaged_file(tmp_path, monkeypatch):
    from compactml.export import artifact

    net = _pruned_net(0.9)
    real = artifact.encode

    def doctored(tensors):
        stored, encodings = real(tensors)
        next(iter(encodings.values()))["shape"][0] += 1
        return stored, encodings

    monkeypatch.setattr(artifact, "encode", doctored)
    cml.save(net, tmp_path / "bad.cml")
    with pytest.raises(ArtifactError, match="damaged"):
        cml.load(tmp_path / "bad.cml", model=_pruned_net(0.5))


def test_a_90_percent_sparse_int8_artifact_is_12x_smaller(tmp_path):
    net = _pruned_net(0.9)
    quantized = cml.quantize(net, cml.WeightOnly(bits=8, group_size=None))
    cml.save(quantized, tmp_path / "q.cml")
    dense_bytes = sum(p.numel() * 4 for n, p in net.named_parameters())
    ratio = dense_bytes / os.path.getsize(tmp_path / "q.cml")
    assert ratio > 12, ratio  # 1 bit of mask + 10% of 8 bits per weight
    encodings = cml.read_manifest(tmp_path / "q.cml")["encodings"]
    kinds = {name: e["kind"] for name, e in encodings.items()}
    assert {name for name, kind in kinds.items() if kind == "sparse"} == {"0.qweight", "2.qweight"}
    assert set(kinds.values()) == {"sparse", "packed"}  # scales, biases and small values
