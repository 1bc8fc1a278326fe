"""Transformers models in .cml artifacts: tied weights and non-persistent buffers."""

from __future__ import annotations

import textwrap

import pytest
import torch

from compactml.export.artifact import load, read_manifest, save
from compactml.source import load_factory

pytest.importorskip("transformers")

BERT_FACTORY = textwrap.dedent(
    """
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=24)


    def masked_lm():
        torch.manual_seed(0)
        return BertForMaskedLM(BertConfig(**CONFIG))


    def encoder():
        torch.manual_seed(0)
        return BertModel(BertConfig(**CONFIG))
    """
)


@pytest.fixture
def bert_file(tmp_path):
    path = tmp_path / "bert.py"
    path.write_text(BERT_FACTORY)
    return path


def test_bert_masked_lm_round_trips_with_tied_embeddings(bert_file, tmp_path, perturb):
    model, _ = load_factory(f"{bert_file}:masked_lm")
    perturb(model)
    decoder, embeddings = "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"
    assert model.state_dict()[decoder].data_ptr() == model.state_dict()[embeddings].data_ptr()
    path = save(model, tmp_path / "bert.cml")
    manifest = read_manifest(path)
    assert manifest["aliases"][decoder] == embeddings
    assert manifest["transforms"] == []
    loaded = load(path, trust_factory=True)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bert_encoder_with_shrunk_layer_and_skeleton(bert_file, tmp_path, perturb):
    model, _ = load_factory(f"{bert_file}:encoder")
    perturb(model)
    # Shrink the intermediate width of the first layer, as channel pruning would.
    block = model.encoder.layer[0]
    block.intermediate.dense = torch.nn.Linear(16, 20)
    block.output.dense = torch.nn.Linear(20, 16)
    perturb(model, seed=4)
    path = save(model, tmp_path / "enc.cml")
    modules = [t["module"] for t in read_manifest(path)["transforms"]]
    assert modules == ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    ids = torch.tensor([[3, 4, 5, 6]])
    skeleton = load_factory(f"{bert_file}:encoder")[0]
    for loaded in (load(path, trust_factory=True), load(path, model=skeleton)):
        assert "embeddings.position_ids" not in loaded.state_dict()
        assert loaded.encoder.layer[0].intermediate.dense.out_features == 20
        with torch.no_grad():
            want = model(input_ids=ids).last_hidden_state
            assert torch.equal(loaded(input_ids=ids).last_hidden_state, want)


def test_a_changed_config_entry_is_restored_on_load(bert_file, tmp_path, perturb):
    model, _ = load_factory(f"{bert_file}:encoder")
    for block in model.encoder.layer:  # every FFN shrunk alike, so the config can say so
        block.intermediate.dense = torch.nn.Linear(16, 20)
        block.output.dense = torch.nn.Linear(20, 16)
    model.config.intermediate_size = 20
    perturb(model)
    path = save(model, tmp_path / "enc.cml")
    ops = [t for t in read_manifest(path)["transforms"] if t["op"] == "set_config"]
    assert ops == [{"op": "set_config", "module": "", "key": "intermediate_size", "value": 20}]
    loaded = load(path, trust_factory=True)
    assert loaded.config.intermediate_size == 20
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, want)


@pytest.mark.parametrize("key, value", [("_secret", 1), ("to_dict", 1), ("x", {"a": 1})])
def test_a_bad_set_config_transform_is_refused(bert_file, key, value):
    from compactml.export.transforms import apply_transform

    model, _ = load_factory(f"{bert_file}:encoder")
    op = {"op": "set_config", "module": "", "key": key, "value": value}
    with pytest.raises(ValueError):
        apply_transform(model, op)
    assert callable(model.config.to_dict) and not hasattr(model.config, "_secret")
