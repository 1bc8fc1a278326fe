"""Classification metrics: accuracy, likelihood, calibration, agreement, noise robustness.

The math is pure functions on tensors (``topk_accuracy``, ``expected_calibration_error``,
``brier_score``...); ``evaluate_classification`` runs the models over the eval batches, keeps a
few numbers per sample (not the full probability table) and reduces them with the same helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.errors import CompactMLError
from compactml.task import primary_output, split_batch

#: Input noise levels (in standard deviations of the eval inputs) that ``evaluate`` scores.
DEFAULT_NOISE_LEVELS = (0.0, 0.1, 0.25, 0.5, 1.0)
#: Seed of the generator drawing the input noise, so noise curves are reproducible.
NOISE_SEED = 0
#: Equal-width confidence bins for the expected calibration error (Guo et al. 2017).
ECE_BINS = 15

Run = Callable[[nn.Module, Any], Any]
Batches = Callable[[str], Iterator[Any]]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of samples whose label is among the ``k`` highest logits (k capped at classes)."""
    check_logits(logits, labels)
    return float(_topk_hits(logits, labels, k).double().mean())


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits)``, in nats."""
    check_logits(logits, labels)
    return float(_nll_terms(logits, labels).mean())


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over samples of sum over classes of (p - onehot)^2.

    0 for perfect confident predictions, 2 at worst; a uniform predictor over C classes scores
    1 - 1/C (Brier 1950).
    """
    check_logits(probs, labels)
    return float(_brier_terms(probs, labels).mean())


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """Expected calibration error of class probabilities ``probs`` (N, C) against ``labels``.

    Confidence is the top probability; see ``calibration_error`` (Guo et al. 2017, "On
    Calibration of Modern Neural Networks").
    """
    check_logits(probs, labels)
    confidences, predictions = probs.float().max(dim=-1)
    return calibration_error(confidences, predictions == labels, bins)


def calibration_error(
    confidences: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE from per-sample confidence and correctness, with ``bins`` equal-width bins.

    ECE = sum over bins B of |B|/n * |accuracy(B) - mean confidence(B)|, bin m holding the
    confidences in ((m-1)/M, m/M] (Guo et al. 2017). A fraction in [0, 1].
    """
    if bins < 1:
        raise CompactMLError(f"ECE needs at least one bin, got {bins}; use bins=15")
    conf = confidences.detach().double().flatten().cpu()
    hits = correct.detach().double().flatten().cpu()
    if conf.numel() == 0 or conf.numel() != hits.numel():
        raise CompactMLError(
            f"ECE needs one correctness flag per confidence, got {conf.numel()} confidences and "
            f"{hits.numel()} flags; pass tensors of the same non-zero length"
        )
    index = (conf * bins).ceil().long().sub(1).clamp(0, bins - 1)
    conf_sum = torch.bincount(index, weights=conf, minlength=bins)
    hit_sum = torch.bincount(index, weights=hits, minlength=bins)
    return float((conf_sum - hit_sum).abs().sum() / conf.numel())


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy within each class present in ``labels``, keyed by class index as a string."""
    predictions, labels = predictions.flatten().cpu(), labels.flatten().cpu()
    result = {}
    for cls in torch.unique(labels).tolist():
        mask = labels == cls
        result[str(int(cls))] = float((predictions[mask] == cls).double().mean())
    return result


def agreement(predictions: torch.Tensor, reference_predictions: torch.Tensor) -> float:
    """Fraction of samples where the model's top-1 class equals the reference's top-1 class."""
    if predictions.shape != reference_predictions.shape or predictions.numel() == 0:
        raise CompactMLError(
            f"agreement needs predictions of equal non-zero length, got "
            f"{tuple(predictions.shape)} and {tuple(reference_predictions.shape)}; "
            "run both models on the same inputs"
        )
    return float((predictions == reference_predictions).double().mean())


def check_logits(logits: Any, labels: Any) -> None:
    """Raise a one-line error unless ``logits`` is (N, C) and ``labels`` holds N class ids."""
    if labels is None:
        raise CompactMLError(
            "classification eval batches need labels; give Task(eval=...) batches of "
            "(inputs, labels) or dicts with a 'labels' key"
        )
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CompactMLError(
            f"classification expects outputs shaped (batch, classes), got {shape}; "
            "give the Task a forward= that returns class logits"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:1]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise CompactMLError(
            f"classification labels must be class ids shaped ({logits.shape[0]},), got {shape}; "
            "pass one integer label per sample"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise CompactMLError(
            f"classification labels must be integer class ids, got {labels.dtype}; "
            "convert them with labels.long()"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise CompactMLError(
            f"a label lies outside the model's {logits.shape[1]} classes "
            f"(labels span {int(labels.min())}..{int(labels.max())}); check the eval labels"
        )


def _topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample flag: is the label among the top-k logits."""
    if k < 1:
        raise CompactMLError(f"top-k accuracy needs k >= 1, got {k}")
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == labels.to(top.device).unsqueeze(-1)).any(dim=-1)


def _nll_terms(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample negative log-likelihood in nats."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, labels.to(log_probs.device).long().unsqueeze(-1)).squeeze(-1)


def _brier_terms(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over classes of (p - onehot)^2."""
    onehot = F.one_hot(labels.to(probs.device).long(), probs.shape[-1]).to(torch.float32)
    return (probs.float() - onehot).pow(2).sum(dim=-1)


class _Scores:
    """Per-sample numbers kept while iterating over batches (a few floats per sample)."""

    def __init__(self) -> None:
        self.columns: dict[str, list[torch.Tensor]] = {}

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self.columns.setdefault(name, []).append(value.detach().cpu())

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.cat(self.columns[name])


class _Moments:
    """Running count, sum and sum of squares of every input value, for their standard deviation."""

    def __init__(self) -> None:
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.count += x.numel()
        self.total += float(x.sum())
        self.squares += float(x.square().sum())

    def std(self) -> float:
        mean = self.total / max(self.count, 1)
        return max(self.squares / max(self.count, 1) - mean * mean, 0.0) ** 0.5


def _score_batch(scores: _Scores, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Record per-sample prediction, confidence, top-5 hit, NLL and Brier terms of one batch."""
    check_logits(logits, labels)
    labels = labels.to(logits.device)
    probs = F.softmax(logits.float(), dim=-1)
    confidence, prediction = probs.max(dim=-1)
    scores.add(
        labels=labels,
        predictions=prediction,
        confidence=confidence,
        top5=_topk_hits(logits, labels, 5),
        nll=_nll_terms(logits, labels),
        brier=_brier_terms(probs, labels),
    )


def evaluate_classification(
    model: nn.Module,
    reference: nn.Module | None,
    batches: Batches,
    run: Run,
    noise_levels: Sequence[float] = DEFAULT_NOISE_LEVELS,
) -> dict[str, Any]:
    """Classification metrics of ``model`` over the eval batches (see ``cml.evaluate``).

    ``batches(description)`` iterates the eval batches afresh; ``run(model, inputs)`` runs a
    model. ``noise`` is present only when every input is a single floating-point tensor.
    """
    scores = _Scores()
    moments = _Moments()
    float_inputs = True
    for batch in batches("evaluating"):
        inputs, labels = split_batch(batch)
        _score_batch(scores, primary_output(run(model, inputs)), labels)
        if reference is not None:
            scores.add(reference=primary_output(run(reference, inputs)).argmax(dim=-1))
        float_inputs = float_inputs and _is_float_tensor(inputs)
        if float_inputs:
            moments.add(inputs)
    labels, predictions = scores["labels"], scores["predictions"]
    correct = predictions == labels
    values: dict[str, Any] = {
        "kind": "classification",
        "samples": int(labels.numel()),
        "top1": float(correct.double().mean()),
        "top5": float(scores["top5"].double().mean()),
        "nll": float(scores["nll"].double().mean()),
        "ece": calibration_error(scores["confidence"], correct),
        "brier": float(scores["brier"].double().mean()),
        "per_class_accuracy": per_class_accuracy(predictions, labels),
    }
    if reference is not None:
        values["agreement"] = agreement(predictions, scores["reference"])
    if float_inputs and noise_levels:
        std = moments.std()
        values["noise"] = noise_accuracy(model, batches, run, noise_levels, std, values["top1"])
    return values


def noise_accuracy(
    model: nn.Module,
    batches: Batches,
    run: Run,
    levels: Sequence[float],
    input_std: float,
    clean_top1: float,
) -> list[dict[str, float]]:
    """Top-1 accuracy under additive Gaussian input noise of ``sigma * input_std``.

    One noise draw ``z`` per batch (from a generator seeded with ``NOISE_SEED``) is scaled to
    every level, so the curve is reproducible and levels differ only in strength. Level 0 is
    the clean accuracy.
    """
    noisy = [s for s in levels if s > 0]
    hits = dict.fromkeys(noisy, 0)
    samples = 0
    generator = torch.Generator().manual_seed(NOISE_SEED)
    if noisy:
        for batch in batches("noise"):
            inputs, labels = split_batch(batch)
            z = torch.randn(inputs.shape, generator=generator, dtype=torch.float32)
            z = z.to(device=inputs.device, dtype=inputs.dtype)
            for sigma in noisy:
                logits = primary_output(run(model, inputs + z * (sigma * input_std)))
                hits[sigma] += int((logits.argmax(dim=-1).cpu() == labels.cpu()).sum())
            samples += int(labels.numel())
    return [{"sigma": float(s), "top1": hits[s] / samples if s > 0 else clean_top1} for s in levels]


def _is_float_tensor(inputs: Any) -> bool:
    """Whether ``inputs`` is one floating-point tensor (noise makes no sense for token ids)."""
    return isinstance(inputs, torch.Tensor) and inputs.is_floating_point()
