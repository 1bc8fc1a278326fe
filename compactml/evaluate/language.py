"""Language-model metrics: next-token negative log-likelihood and perplexity.

Perplexity is token-weighted over the whole eval set, exp(total NLL / total tokens), not a mean
of per-batch perplexities, so batches of different lengths count by their tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.errors import CompactMLError
from compactml.task import primary_output, split_batch

#: Label value marking positions that are not scored (padding, prompts), as in Hugging Face.
IGNORE_INDEX = -100

Run = Callable[[nn.Module, Any], Any]
Batches = Callable[[str], Iterator[Any]]


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the number of scored tokens.

    Position ``t`` of ``logits`` (batch, time, vocab) predicts ``labels[..., t + 1]``; labels
    equal to -100 are skipped.
    """
    _check_lm(logits, labels)
    shifted = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
    targets = labels[..., 1:].reshape(-1).to(shifted.device).long()
    total = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((targets != IGNORE_INDEX).sum())


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(total NLL / tokens): the effective number of equally likely next tokens."""
    if tokens <= 0:
        raise CompactMLError(
            "no tokens to score: every label is -100 or sequences are one token long; "
            "give eval batches labels with at least two positions"
        )
    return math.exp(total_nll / tokens)


def evaluate_language_model(model: nn.Module, batches: Batches, run: Run) -> dict[str, Any]:
    """Token-weighted NLL and perplexity of ``model`` over the eval batches (``cml.evaluate``)."""
    total, tokens = 0.0, 0
    for batch in batches("evaluating"):
        inputs, labels = split_batch(batch)
        if labels is None:
            raise CompactMLError(
                "language-model eval batches need labels (token ids); give dicts with a "
                "'labels' key (e.g. a copy of input_ids) or (inputs, labels) tuples"
            )
        batch_nll, batch_tokens = next_token_nll(primary_output(run(model, inputs)), labels)
        total += batch_nll
        tokens += batch_tokens
    ppl = perplexity(total, tokens)
    return {"kind": "language_model", "tokens": tokens, "nll": total / tokens, "perplexity": ppl}


def _check_lm(logits: Any, labels: Any) -> None:
    """Raise unless logits are (..., time, vocab) and labels are integer ids (..., time)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CompactMLError(
            f"a language model must return logits shaped (batch, time, vocab), got {shape}; "
            "give the Task a forward= that returns them"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:-1]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise CompactMLError(
            f"language-model labels must be shaped {tuple(logits.shape[:-1])} like the logits "
            f"without the vocabulary axis, got {shape}; pass one token id per position"
        )
    if labels.is_floating_point():
        raise CompactMLError(
            f"language-model labels must be integer token ids, got {labels.dtype}; "
            "convert them with labels.long()"
        )
    targets = labels[..., 1:]  # the first position is never predicted
    scored = targets[targets != IGNORE_INDEX]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= logits.shape[-1]):
        raise CompactMLError(
            f"a label lies outside the model's vocabulary of {logits.shape[-1]} tokens (labels "
            f"span {int(scored.min())}..{int(scored.max())}); use -100 for positions to skip"
        )
