"""Small tensors are packed into one blob, read back bit-exactly; bad layouts are refused."""

from __future__ import annotations

import pytest
import torch

from compactml.export.encodings import MASK_SUFFIX, VALUES_SUFFIX, decode, encode
from compactml.export.packing import PACK_MAX_BYTES, PACKED_NAME, pack, unpack


def _small_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "b.bias": torch.randn(10, generator=gen),
        "a.scale": torch.randn(7, generator=gen).half(),  # odd byte count: later ones unaligned
        "c.bf": torch.randn(3, generator=gen).bfloat16(),
        "d.zero_point": torch.tensor(-5, dtype=torch.int32),  # 0-d
        "e.steps": torch.tensor([2**40 + 3], dtype=torch.int64),
        "f.codes": torch.randint(0, 256, (3, 5), generator=gen, dtype=torch.uint8),
        "g.signed": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "h.mask": torch.tensor([True, False, True]),
        "i.empty": torch.zeros(0, 3),
        "j.nan": torch.tensor([float("nan"), -0.0, float("inf")]),
    }


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def test_small_tensors_round_trip_bit_exact_in_one_blob():
    tensors = _small_tensors()
    big = torch.randn(PACK_MAX_BYTES // 4 + 1)
    stored, entries = pack({**tensors, "big.weight": big})
    assert set(stored) == {PACKED_NAME, "big.weight"} and stored["big.weight"] is big
    assert set(entries) == set(tensors)
    assert entries["a.scale"] == {"kind": "packed", "dtype": "float16", "shape": [7]}
    blob = stored[PACKED_NAME]
    assert blob.dtype == torch.uint8 and blob.numel() == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    # name order, no padding: a.scale's 14 bytes come first, then b.bias
    assert torch.equal(blob[14:54], tensors["b.bias"].view(torch.uint8))
    out = unpack(stored, entries)
    for name, tensor in tensors.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        assert torch.equal(_bytes(out[name]), _bytes(tensor)), name


def test_a_single_small_tensor_is_not_packed():
    stored, entries = pack({"bias": torch.ones(4), "weight": torch.ones(2000)})
    assert entries == {} and set(stored) == {"bias", "weight"}


def test_bitmasks_and_values_of_small_sparse_tensors_are_packed_and_decoded():
    weight = torch.zeros(8, 16)
    weight[::3, ::5] = torch.arange(1.0, 13.0).reshape(3, 4)
    tensors = {"fc.weight": weight, "fc.weight_mask": weight != 0, "fc.bias": torch.ones(8)}
    stored, encodings = encode(tensors)
    assert {"fc.weight" + MASK_SUFFIX, "fc.weight" + VALUES_SUFFIX} <= set(stored)
    stored, packed = pack(stored)
    assert set(stored) == {PACKED_NAME}
    decoded = decode(stored, encodings | packed)
    assert set(decoded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(decoded[name], tensor) and decoded[name].dtype == tensor.dtype


def _packed() -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    return pack({"a": torch.arange(4.0), "b": torch.tensor([1, 2], dtype=torch.int32)})


DOCTORED = {
    "shape past the end": (lambda s, e: e["b"].update(shape=[3]), "run past the end"),
    "shape short of the end": (lambda s, e: e["a"].update(shape=[3]), "holds 24 bytes, but"),
    "huge shape": (lambda s, e: e["a"].update(shape=[2**40, 2**40]), "run past the end"),
    "negative size": (lambda s, e: e["a"].update(shape=[-1]), "invalid shape"),
    "float size": (lambda s, e: e["a"].update(shape=[4.0]), "invalid shape"),
    "unknown dtype": (lambda s, e: e["a"].update(dtype="complex64"), "unknown dtype"),
    "dtype not a string": (lambda s, e: e["a"].update(dtype=["float32"]), "unknown dtype"),
    "extra field": (lambda s, e: e["a"].update(offset=0), "has fields"),
    "missing field": (lambda s, e: e["a"].pop("shape"), "has fields"),
    "missing blob": (lambda s, e: s.pop(PACKED_NAME), "missing or not a uint8 vector"),
    "blob of floats": (lambda s, e: s.update({PACKED_NAME: torch.zeros(6)}), "not a uint8 vector"),
    "also stored densely": (lambda s, e: s.update(a=torch.zeros(4)), "both densely and packed"),
    "blob without entries": (lambda s, e: e.clear(), "belongs to no encoded tensor"),
    "bool from other bytes": (
        lambda s, e: e.update(b={"kind": "packed", "dtype": "bool", "shape": [8]}),
        "bytes other than 0 and 1",
    ),
}


@pytest.mark.parametrize("case", DOCTORED, ids=list(DOCTORED))
def test_a_doctored_layout_is_refused(case):
    stored, entries = _packed()
    doctor, message = DOCTORED[case]
    doctor(stored, entries)
    with pytest.raises(ValueError, match=message):
        decode(stored, entries)
