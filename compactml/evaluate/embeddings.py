"""Embedding metrics: retrieval quality (recall@k, MRR) and cosine fidelity to a reference.

Eval batches are ``(query_inputs, document_inputs)``; query ``i`` of the whole eval set should
retrieve document ``i`` among all documents of the eval set. Embeddings are L2-normalized, so
retrieval ranks by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.errors import CompactMLError
from compactml.task import primary_output, split_batch

#: Queries scored at once against all documents; bounds memory to CHUNK x documents.
CHUNK = 1024

Run = Callable[[nn.Module, Any], Any]
Batches = Callable[[str], Iterator[Any]]


def retrieval_ranks(query_emb: torch.Tensor, doc_emb: torch.Tensor) -> torch.Tensor:
    """1-based rank of document ``i`` among all documents for query ``i``, by cosine similarity.

    Ties count against the query (a document as similar as the right one ranks ahead of it),
    so a collapsed model that maps everything to one vector scores worst, not best.
    """
    _check_pairs(query_emb, doc_emb)
    queries = F.normalize(query_emb.detach().float(), dim=-1)
    docs = F.normalize(doc_emb.detach().float(), dim=-1)
    ranks = []
    for start in range(0, len(queries), CHUNK):
        sims = queries[start : start + CHUNK] @ docs.T
        rows = torch.arange(len(sims), device=sims.device)
        correct = sims[rows, rows + start].unsqueeze(-1)
        ranks.append((sims >= correct).sum(dim=-1).cpu())
    return torch.cat(ranks)


def retrieval_metrics(
    query_emb: torch.Tensor, doc_emb: torch.Tensor, ks: Sequence[int] = (1, 10)
) -> dict[str, float]:
    """Recall@k for each k and mean reciprocal rank of query ``i`` retrieving document ``i``.

    Returns ``{"recall@1": ..., "recall@10": ..., "mrr": ...}``, all fractions in [0, 1].
    """
    if any(k < 1 for k in ks):
        raise CompactMLError(f"recall@k needs k >= 1, got {list(ks)}")
    ranks = retrieval_ranks(query_emb, doc_emb).double()
    result = {f"recall@{k}": float((ranks <= k).double().mean()) for k in ks}
    result["mrr"] = float((1.0 / ranks).mean())
    return result


def cosine_fidelity(embeddings: torch.Tensor, reference_emb: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity between a model's embeddings and a reference's, in [-1, 1]."""
    if embeddings.shape != reference_emb.shape:
        raise CompactMLError(
            f"cosine fidelity needs embeddings of the same shape, got {tuple(embeddings.shape)} "
            f"and {tuple(reference_emb.shape)}; compare models with the same embedding size"
        )
    return F.cosine_similarity(embeddings.float(), reference_emb.float(), dim=-1)


def evaluate_embedding(
    model: nn.Module, reference: nn.Module | None, batches: Batches, run: Run
) -> dict[str, Any]:
    """Retrieval and fidelity metrics of ``model`` over the eval batches (see ``cml.evaluate``).

    ``cosine_fidelity`` (mean) and ``cosine_fidelity_min`` cover every query and document and
    need a reference with the same embedding size; otherwise ``cosine_fidelity_skipped`` says
    why they are absent.
    """
    queries, docs, ref_queries, ref_docs = [], [], [], []
    for batch in batches("evaluating"):
        query_inputs, doc_inputs = split_batch(batch)
        if doc_inputs is None:
            raise CompactMLError(
                "embedding eval batches must be (query_inputs, document_inputs) pairs; "
                "give Task(eval=...) a list of such tuples"
            )
        queries.append(_embed(model, query_inputs, run))
        docs.append(_embed(model, doc_inputs, run))
        if reference is not None:
            ref_queries.append(_embed(reference, query_inputs, run))
            ref_docs.append(_embed(reference, doc_inputs, run))
    query_emb, doc_emb = torch.cat(queries), torch.cat(docs)
    values: dict[str, Any] = {"kind": "embedding", "queries": int(len(query_emb))}
    values.update(retrieval_metrics(query_emb, doc_emb, ks=(1, 10)))
    if reference is not None:
        ours = torch.cat([query_emb, doc_emb])
        theirs = torch.cat(ref_queries + ref_docs)
        if ours.shape == theirs.shape:
            cosines = cosine_fidelity(ours, theirs)
            values["cosine_fidelity"] = float(cosines.mean())
            values["cosine_fidelity_min"] = float(cosines.min())
        else:
            values["cosine_fidelity_skipped"] = (
                f"embedding sizes differ ({ours.shape[-1]} vs reference {theirs.shape[-1]})"
            )
    return values


def _embed(model: nn.Module, inputs: Any, run: Run) -> torch.Tensor:
    """Embeddings (N, D) of ``inputs`` on the CPU, as float32."""
    emb = primary_output(run(model, inputs))
    if emb.dim() != 2:
        raise CompactMLError(
            f"an embedding model must return one vector per input, shaped (batch, dim), got "
            f"{tuple(emb.shape)}; give the Task a forward= that pools token vectors"
        )
    return emb.detach().float().cpu()


def _check_pairs(query_emb: torch.Tensor, doc_emb: torch.Tensor) -> None:
    """Raise unless queries and documents are equally many (N, D) matrices, N > 0."""
    if query_emb.dim() != 2 or query_emb.shape != doc_emb.shape or len(query_emb) == 0:
        raise CompactMLError(
            f"retrieval needs one document per query, both shaped (N, dim), got queries "
            f"{tuple(query_emb.shape)} and documents {tuple(doc_emb.shape)}; pair each query "
            "with its document in every eval batch"
        )
