"""Task: the one data contract between a user's data and every compactml technique.

A Task holds three streams of batches (``calib`` for statistics, ``train`` for fine-tuning,
``eval`` for measuring), says how to run the model on a batch (``forward``), how to score it
(``metric``) and how to train on it (``loss``). Techniques read data only through a Task.

A batch is either an ``(inputs, targets)`` tuple or a Hugging Face style dict of tensors whose
target, if any, sits under ``labels``. ``inputs`` may itself be a tensor, a tuple of tensors
(passed positionally) or a dict (passed as keyword arguments).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.errors import CompactMLError

Batch = Any
Data = Iterable[Batch] | Callable[[], Iterable[Batch]] | None

#: The built-in metrics and what kind of model each one scores.
METRIC_KINDS = {
    "accuracy": "classification",
    "embedding": "embedding",
    "perplexity": "language_model",
}
TARGET_KEYS = ("labels", "label", "targets", "target")


def primary_output(outputs: Any) -> torch.Tensor:
    """The tensor a metric should read from a model's outputs.

    Accepts a tensor, an object with ``.logits`` (Hugging Face), a dict with ``logits``, or a
    tuple/list whose first element is the tensor.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, dict):
        if isinstance(outputs.get("logits"), torch.Tensor):
            return outputs["logits"]
        first = next(iter(outputs.values()), None)
        if isinstance(first, torch.Tensor):
            return first
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise CompactMLError(
        f"cannot find a tensor in model outputs of type {type(outputs).__name__}; "
        "give the Task a forward= that returns a tensor"
    )


def split_batch(batch: Batch) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, targets)``; targets is None for unlabeled batches."""
    if isinstance(batch, dict):
        for key in TARGET_KEYS:
            if key in batch:
                inputs = {k: v for k, v in batch.items() if k != key}
                return inputs, batch[key]
        return batch, None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise CompactMLError(
            f"a batch tuple has {len(batch)} items; batches must be (inputs, targets) "
            "or a dict of tensors"
        )
    return batch, None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on ``inputs``: dicts as keyword arguments, tuples positionally."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs: Any) -> int:
    """Number of samples in ``inputs`` (the first dimension of its first tensor)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, dict):
        return batch_size(next(iter(inputs.values())))
    if isinstance(inputs, (tuple, list)) and inputs:
        return batch_size(inputs[0])
    raise CompactMLError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}")


def tensor_nbytes(value: Any) -> int:
    """Bytes held by all tensors in a nested structure of tensors, tuples, lists and dicts."""
    from torch.utils._pytree import tree_leaves

    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if torch.is_tensor(t))


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for a block; restore every submodule's own flag afterwards."""
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for module, _ in flags:
            module.training = False
        yield
    finally:
        for module, training in flags:
            module.training = training


def describe(inputs: Any) -> str:
    """A short human description of inputs: shapes and dtypes, for error messages."""
    if isinstance(inputs, torch.Tensor):
        return f"tensor{tuple(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in inputs) + ")"
    return type(inputs).__name__


@dataclass(eq=False)
class Task:
    """What a technique needs to know about the user's data and goal.

    Args:
        calib: batches for calibration statistics (no targets needed).
        train: batches for fine-tuning (quantization-aware training, pruning schedules).
        eval: labeled batches for ``cml.evaluate``.
        metric: ``"accuracy"`` (classification), ``"embedding"`` (eval batches are
            ``(query_inputs, document_inputs)``: retrieval of each document by its query),
            ``"perplexity"`` (causal language model; targets are token ids), or a callable
            ``metric(model, task) -> dict`` for anything else.
        loss: ``loss(outputs, targets) -> scalar``; defaults follow ``metric``.
        forward: ``forward(model, inputs) -> outputs``; defaults to calling the model.
        example: one input for tracing and profiling; defaults to the first calibration batch.
        reference: the uncompressed model, for metrics measured against it (fidelity,
            agreement) when ``cml.evaluate`` is not given one.
        name: a label for reports.

    Each of ``calib``, ``train`` and ``eval`` is an iterable of batches that can be iterated
    more than once (a list, a DataLoader), or a zero-argument callable returning one.
    """

    calib: Data = None
    train: Data = None
    eval: Data = None
    metric: str | Callable[[nn.Module, Task], dict] = "accuracy"
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    forward: Callable[[nn.Module, Any], Any] | None = None
    example: Any = None
    reference: nn.Module | None = None
    name: str = "task"

    def __post_init__(self) -> None:
        if isinstance(self.metric, str) and self.metric not in METRIC_KINDS:
            known = ", ".join(sorted(METRIC_KINDS))
            raise CompactMLError(
                f"unknown metric {self.metric!r}; use one of {known} or pass a callable"
            )

    @property
    def kind(self) -> str:
        """``classification``, ``embedding``, ``language_model`` or ``custom``."""
        return METRIC_KINDS.get(self.metric, "custom") if isinstance(self.metric, str) else "custom"

    def batches(self, split: str, limit: int | None = None) -> Iterator[Batch]:
        """Iterate over the batches of ``split`` (``calib``, ``train`` or ``eval``)."""
        if split not in ("calib", "train", "eval"):
            raise ValueError(f"unknown split {split!r}")
        data = getattr(self, split)
        if data is None:
            raise CompactMLError(
                f"the task has no {split} data; pass Task({split}=...) with a list of batches"
            )
        if callable(data) and not hasattr(data, "__iter__"):
            data = data()
        return iter(data) if limit is None else itertools.islice(data, limit)

    def has(self, split: str) -> bool:
        """Whether the task was given data for ``split``."""
        return getattr(self, split) is not None

    def run(self, model: nn.Module, inputs: Any) -> Any:
        """Run ``model`` on ``inputs`` the way this task says (``forward=``, or a plain call)."""
        if self.forward is not None:
            return self.forward(model, inputs)
        return call_model(model, inputs)

    def batch_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of ``model`` on one batch (used by fine-tuning loops)."""
        inputs, targets = split_batch(batch)
        outputs = self.run(model, inputs)
        if self.loss is not None:
            return self.loss(outputs, targets)
        if self.metric == "accuracy":
            return F.cross_entropy(primary_output(outputs), targets)
        if self.metric == "perplexity":
            return causal_lm_loss(primary_output(outputs), targets)
        if self.metric == "embedding":
            # In-batch contrastive loss: each query should be closest to its own document.
            queries = F.normalize(primary_output(outputs), dim=-1)
            docs = F.normalize(primary_output(self.run(model, targets)), dim=-1)
            logits = queries @ docs.T / 0.05
            return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
        raise CompactMLError("the task has a custom metric and no loss; pass Task(loss=...)")

    def example_input(self) -> Any:
        """One input suitable for tracing, profiling and export."""
        if self.example is not None:
            return self.example
        for split in ("calib", "eval", "train"):
            if self.has(split):
                batch = next(self.batches(split), None)
                if batch is not None:
                    return split_batch(batch)[0]
        raise CompactMLError("the task has no data to take an example input from; pass example=")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; label -100 marks positions to ignore."""
    shifted = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    return F.cross_entropy(shifted, labels[..., 1:].reshape(-1), ignore_index=-100)
