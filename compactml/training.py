"""``fine_tune``: the shared training loop (pruning schedules, distillation, users).

Adam on a loss over ``task.train`` with a cosine-decayed learning rate, the model in ordinary
training mode (BatchNorm updates its statistics, dropout is on). A model that carries pruning
masks keeps them: the masks are re-applied after every optimizer step
(:func:`compactml.prune.masks.keep_masks`), so pruned weights stay exactly zero.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.progress import progress_bar
from compactml.prune.masks import keep_masks, masked_layers
from compactml.task import Batch, Task

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@contextlib.contextmanager
def train_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule of ``model`` in training mode for a block; restore each one's own
    flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.train()
        yield
    finally:
        for module, training in flags:
            module.training = training


def _check_args(epochs: Any, lr: Any) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise CompactMLError(f"epochs must be an integer >= 0, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise CompactMLError(f"lr must be a positive number such as 1e-3, got {lr!r}")


def _batches_per_epoch(task: Task) -> int | None:
    """``len(task.train)`` when the data has a length (a list, a DataLoader), else None."""
    data = task.train() if callable(task.train) and not hasattr(task.train, "__iter__") else None
    data = task.train if data is None else data
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def fine_tune(
    model: nn.Module,
    task: Task,
    epochs: int,
    lr: float,
    *,
    progress: bool = True,
    description: str = "fine-tuning",
    keep: bool | None = None,
    loss: LossFn | None = None,
) -> nn.Module:
    """Train ``model`` in place for ``epochs`` passes over ``task.train`` and return it.

    Args:
        model: the model to train (changed in place; every module's train/eval flag is
            restored afterwards).
        task: supplies the ``train`` batches and, by default, the loss (``task.batch_loss``).
        epochs: passes over ``task.train`` (0 trains nothing).
        lr: Adam's learning rate at the start, decayed to zero by a cosine over all steps (per
            batch when ``task.train`` has a length, else per epoch).
        progress: show a progress bar over the epochs.
        description: the progress bar's label.
        keep: keep pruning masks (re-apply them after every step); None keeps them when the
            model has any.
        loss: ``loss(model, batch) -> scalar`` used instead of ``task.batch_loss`` (e.g. a
            distillation loss).

    A loss that becomes NaN or infinite raises CompactMLError suggesting a lower ``lr``.
    """
    _check_args(epochs, lr)
    if not isinstance(task, Task) or not task.has("train"):
        raise CompactMLError("fine-tuning needs a Task with train batches; pass Task(train=...)")
    loss_fn = loss if loss is not None else task.batch_loss
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or epochs == 0:
        return model
    optimizer = torch.optim.Adam(params, lr=float(lr))
    per_epoch = _batches_per_epoch(task)
    total = epochs * per_epoch if per_epoch else epochs
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    keep = bool(masked_layers(model)) if keep is None else keep
    handle = keep_masks(optimizer, model) if keep else None
    try:
        with train_mode(model):
            for _ in progress_bar(range(epochs), description, enabled=progress):
                for batch in task.batches("train"):
                    optimizer.zero_grad(set_to_none=True)
                    value = loss_fn(model, batch)
                    if not bool(torch.isfinite(value)):
                        raise CompactMLError(
                            f"the training loss became {float(value.detach())}; lower lr "
                            f"(now {lr}) or check the data"
                        )
                    value.backward()
                    optimizer.step()
                    if per_epoch:
                        schedule.step()
                if not per_epoch:
                    schedule.step()
    finally:
        if handle is not None:
            handle.remove()
        optimizer.zero_grad(set_to_none=True)
    return model
