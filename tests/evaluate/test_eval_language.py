"""Next-token NLL and token-weighted perplexity."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compactml.errors import CompactMLError
from compactml.evaluate import evaluate
from compactml.evaluate.language import next_token_nll
from compactml.task import Task


class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids: torch.Tensor, attention_mask=None):
        return {"logits": self.bias.expand(*input_ids.shape, self.vocab)}


class Bigram(nn.Module):
    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 11, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_uniform_logits_give_perplexity_equal_to_vocabulary():
    x = ids(3, 8, 0)
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    metrics = evaluate(Uniform(11), Task(eval=[batch], metric="perplexity"))
    assert metrics.kind == "language_model" and metrics.primary == "perplexity"
    assert metrics["perplexity"] == pytest.approx(11.0, abs=1e-4)
    assert metrics["nll"] == pytest.approx(math.log(11), abs=1e-6)
    assert metrics["tokens"] == 3 * 7


def test_next_token_nll_hand_case_and_ignore_index():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, 5.0]]])  # p(0) = 3/4 at t=1
    labels = torch.tensor([[9, 1, 0]])  # the first label is never predicted
    total, tokens = next_token_nll(logits, labels)
    assert tokens == 2 and total == pytest.approx(math.log(2) + math.log(4 / 3))
    total, tokens = next_token_nll(logits, torch.tensor([[9, -100, 0]]))
    assert tokens == 1 and total == pytest.approx(math.log(4 / 3))


def test_perplexity_is_token_weighted_across_batches():
    torch.manual_seed(0)
    model = Bigram()
    short, long = ids(2, 3, 1), ids(2, 17, 2)
    long[0, 10:] = -100  # padding is not scored
    inputs_long = long.clamp(min=0)
    task = Task(eval=[(short, short), (inputs_long, long)], metric="perplexity")
    metrics = evaluate(model, task)
    with torch.no_grad():
        sums = [
            F.cross_entropy(model(x)[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1), reduction="sum")
            for x, y in [(short, short), (inputs_long, long)]
        ]
    counts = [2 * 2, 2 * 16 - 7]
    assert metrics["tokens"] == sum(counts)
    expected = math.exp(float(sum(sums)) / sum(counts))
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-5)
    mean_of_batches = sum(math.exp(float(s) / c) for s, c in zip(sums, counts, strict=True)) / 2
    assert abs(metrics["perplexity"] - mean_of_batches) > 0.01


def test_language_model_errors():
    x = ids(2, 5, 0)
    with pytest.raises(CompactMLError, match="need labels"):
        evaluate(Bigram(), Task(eval=[{"input_ids": x}], metric="perplexity"))
    with pytest.raises(CompactMLError, match="no tokens"):
        evaluate(Bigram(), Task(eval=[(x, torch.full_like(x, -100))], metric="perplexity"))
    with pytest.raises(CompactMLError, match="vocabulary of 11"):
        evaluate(Bigram(), Task(eval=[(x, x + 11)], metric="perplexity"))
