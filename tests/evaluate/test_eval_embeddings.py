"""Retrieval metrics and cosine fidelity, pure and through cml.evaluate."""

import copy

import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.evaluate import evaluate
from compactml.evaluate.embeddings import cosine_fidelity, retrieval_metrics, retrieval_ranks
from compactml.task import Task


def test_identity_retrieval_is_perfect():
    emb = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    assert retrieval_metrics(emb, emb) == {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0}


def test_known_ranks_give_the_computed_mrr():
    # similarity of query i (= e_i) to doc j is column i of these rows; all docs have norm 2
    cols = torch.tensor([[0.9, 0.4, 0.2], [0.1, 0.3, 0.3], [0.1, 0.1, 0.1]])
    docs = torch.cat([cols, (4 - cols.square().sum(1, keepdim=True)).sqrt()], dim=1)
    queries = torch.eye(3, 4)
    assert retrieval_ranks(queries, docs).tolist() == [1, 2, 3]
    metrics = retrieval_metrics(queries, docs, ks=(1, 2))
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@2"] == pytest.approx(2 / 3)


def test_a_collapsed_model_scores_worst_not_best():
    same = torch.ones(5, 4)
    assert retrieval_metrics(same, same)["mrr"] == pytest.approx(1 / 5)


def test_cosine_fidelity_pure():
    a = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(cosine_fidelity(a, 3 * a), torch.ones(10), atol=1e-6)
    assert cosine_fidelity(a, -a).max() < -0.99
    with pytest.raises(CompactMLError, match="same shape"):
        cosine_fidelity(a, a[:, :3])


class Identity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.eye(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_retrieval_is_over_all_documents_of_the_eval_set():
    e = torch.eye(4)
    queries, docs = e, e[[0, 1, 0, 3]]  # doc 2 duplicates doc 0; query 2 has no match
    task = Task(eval=[(queries[:2], docs[:2]), (queries[2:], docs[2:])], metric="embedding")
    metrics = evaluate(Identity(), task)
    assert metrics.kind == "embedding" and metrics.primary == "mrr"
    assert metrics["queries"] == 4
    # ranks over all 4 documents: 2 (tie with doc 2), 1, 4 (all tie at 0), 1
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 4 + 1) / 4)
    assert metrics["recall@1"] == 0.5 and metrics["recall@10"] == 1.0
    assert "cosine_fidelity" not in metrics


class Pooled(nn.Module):
    """A sentence encoder on Hugging Face style inputs: masked mean of token embeddings."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        mask = attention_mask.unsqueeze(-1).float()
        return {"sentence_embedding": (self.emb(input_ids) * mask).sum(1) / mask.sum(1)}


def dict_task() -> Task:
    g = torch.Generator().manual_seed(0)

    def side(ids):
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    batches = []
    for _ in range(2):
        ids = torch.randint(0, 20, (5, 6), generator=g)
        batches.append((side(ids), side(ids.flip(1))))  # a document: the query reversed
    return Task(eval=batches, metric="embedding")


def test_dict_inputs_and_cosine_fidelity():
    torch.manual_seed(0)
    model, task = Pooled(), dict_task()
    metrics = evaluate(model, task, reference=model)
    assert metrics["mrr"] == 1.0  # mean pooling ignores order
    assert metrics["cosine_fidelity"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["cosine_fidelity_min"] == pytest.approx(1.0, abs=1e-6)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.emb.weight.add_(0.5 * torch.randn_like(perturbed.emb.weight))
    noisy = evaluate(perturbed, task, reference=model)
    assert noisy["cosine_fidelity_min"] <= noisy["cosine_fidelity"] < 0.99


def test_different_embedding_sizes_skip_fidelity_and_bad_batches_fail():
    task = dict_task()
    metrics = evaluate(Pooled(8), task, reference=Pooled(4))
    assert (
        "cosine_fidelity" not in metrics
        and "8 vs reference 4" in metrics["cosine_fidelity_skipped"]
    )
    with pytest.raises(CompactMLError, match="pairs"):
        evaluate(Identity(), Task(eval=[{"x": torch.eye(4)}], metric="embedding"))
    with pytest.raises(CompactMLError, match="one document per query"):
        evaluate(Identity(), Task(eval=[(torch.eye(4), torch.eye(4)[:3])], metric="embedding"))
