"""``cml.evaluate``: measure a model's quality on a Task's eval data.

The kind of measurement follows ``task.metric``: classification (accuracy, calibration, noise
robustness, agreement with a reference), embedding retrieval (recall, MRR, cosine fidelity to a
reference), language modelling (token-weighted perplexity), or a user's callable. The math
lives in pure functions in ``classification.py``, ``embeddings.py`` and ``language.py``; this
module only runs the models: eval mode, no gradients, inputs on the model's device, a one-line
error when the first batch does not fit, and a progress bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compactml.checks import check_finite, run_checked
from compactml.errors import CompactMLError
from compactml.evaluate.classification import DEFAULT_NOISE_LEVELS, evaluate_classification
from compactml.evaluate.embeddings import evaluate_embedding
from compactml.evaluate.language import evaluate_language_model
from compactml.progress import progress_bar
from compactml.task import Batch, Task, eval_mode

#: The headline metric of each kind of model, and whether higher or lower is better.
PRIMARY = {
    "classification": ("top1", "higher"),
    "embedding": ("mrr", "higher"),
    "language_model": ("perplexity", "lower"),
}


class Metrics(dict):
    """The result of ``cml.evaluate``: a plain dict of JSON-able values, plus names.

    ``metrics["kind"]`` is ``classification``, ``embedding``, ``language_model`` or ``custom``;
    ``primary`` names the headline metric (from ``PRIMARY``; for custom metrics, the first key
    the callable returned) and ``primary_value`` is its value. All rates are fractions in [0, 1].
    """

    def __init__(self, values: Mapping[str, Any], kind: str | None = None) -> None:
        super().__init__()
        kind = kind if kind is not None else values.get("kind")
        if not isinstance(kind, str):
            raise CompactMLError("Metrics need a kind; pass Metrics(values, kind='custom')")
        self["kind"] = kind
        self.update({k: v for k, v in values.items() if k != "kind"})

    @property
    def kind(self) -> str:
        """``classification``, ``embedding``, ``language_model`` or ``custom``."""
        return self["kind"]

    @property
    def primary(self) -> str:
        """The name of the headline metric."""
        if self.kind in PRIMARY:
            return PRIMARY[self.kind][0]
        names = [k for k in self if k != "kind"]
        if not names:
            raise CompactMLError("these metrics hold no values; return a non-empty dict")
        return names[0]

    @property
    def primary_value(self) -> Any:
        """The value of the headline metric."""
        return self[self.primary]


def evaluate(
    model: nn.Module,
    task: Task,
    reference: nn.Module | None = None,
    *,
    limit: int | None = None,
    noise_levels: Sequence[float] = DEFAULT_NOISE_LEVELS,
    progress: bool = False,
) -> Metrics:
    """Measure ``model`` on ``task``'s eval data; the model is never modified.

    Args:
        model: the model to score; evaluated in eval mode, its training flags restored after.
        task: gives the eval batches, how to run the model, and the metric.
        reference: the uncompressed model for agreement / cosine fidelity; defaults to
            ``task.reference``.
        limit: evaluate only the first ``limit`` batches.
        noise_levels: classification only; standard deviations of additive Gaussian input
            noise, in units of the standard deviation of the eval inputs.
        progress: show a progress bar over batches.
    """
    check_finite(model)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise CompactMLError(f"limit must be a positive number of batches, got {limit!r}")
    levels = _check_noise_levels(noise_levels)
    reference = reference if reference is not None else task.reference
    if reference is not None:
        check_finite(reference)
    models = [model] if reference is None else [model, reference]
    if task.kind == "custom":
        with eval_mode(*models):
            return _custom_metrics(task.metric(model, task))
    task.batches("eval", limit)  # raises the Task's own error when there is no eval data
    batches = _batch_source(task, limit, progress)
    runner = _Runner(task)
    with eval_mode(*models), torch.inference_mode():
        if task.kind == "classification":
            values = evaluate_classification(model, reference, batches, runner, levels)
        elif task.kind == "embedding":
            values = evaluate_embedding(model, reference, batches, runner)
        else:
            values = evaluate_language_model(model, batches, runner)
    return Metrics(values, kind=task.kind)


class _Runner:
    """Runs a model on inputs the task's way: first call checked, inputs on the model's device."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.checked: set[int] = set()

    def __call__(self, model: nn.Module, inputs: Any) -> Any:
        inputs = _to_device(inputs, _device_of(model))
        if id(model) in self.checked:
            return self.task.run(model, inputs)
        outputs = run_checked(model, inputs, self.task.run, what="the first eval batch")
        self.checked.add(id(model))
        return outputs


def _batch_source(task: Task, limit: int | None, progress: bool) -> Callable[[str], Iterator]:
    """A function that iterates the eval batches afresh, with a progress bar if asked."""
    total = None
    if hasattr(task.eval, "__len__"):
        total = len(task.eval) if limit is None else min(limit, len(task.eval))

    passes = []  # batches seen in each earlier pass

    def batches(description: str) -> Iterator[Batch]:
        count = 0
        for batch in progress_bar(
            task.batches("eval", limit), description, total=total, enabled=progress
        ):
            count += 1
            yield batch
        if count == 0 and any(passes):
            raise CompactMLError(
                "the task's eval data ran out after one pass; pass a list or a DataLoader "
                "(or a function returning one), not a one-shot iterator"
            )
        if count == 0:
            raise CompactMLError(
                "the task's eval data has no batches; pass Task(eval=...) with at least one batch"
            )
        passes.append(count)

    return batches


def _device_of(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a model without any)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def _to_device(inputs: Any, device: torch.device | None) -> Any:
    """Move the tensors in ``inputs`` (a tensor, dict, tuple or list) to ``device``."""
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs


def _check_noise_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """Noise levels as a tuple of finite non-negative floats, or a one-line error."""
    try:
        values = tuple(float(s) for s in levels)
    except (TypeError, ValueError) as exc:
        raise CompactMLError(
            f"noise_levels must be a list of numbers, got {levels!r}; e.g. (0.0, 0.1, 0.5)"
        ) from exc
    if any(not math.isfinite(s) or s < 0 for s in values):
        raise CompactMLError(
            f"noise_levels must be finite and non-negative, got {list(values)}; e.g. (0.0, 0.5)"
        )
    return values


def _custom_metrics(values: Any) -> Metrics:
    """Wrap what a custom metric callable returned; one-element tensors become numbers."""
    if not isinstance(values, Mapping) or not values:
        raise CompactMLError(
            f"the task's metric returned {type(values).__name__}; "
            "a custom metric must return a non-empty dict such as {'score': 0.9}"
        )
    clean = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        clean[str(key)] = value
    return Metrics(clean, kind="custom")


__all__ = ["Metrics", "PRIMARY", "evaluate"]
