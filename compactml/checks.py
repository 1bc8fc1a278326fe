"""Input checks shared by every entry point: finite weights, and a model that runs on its input."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactml.errors import CompactMLError, first_line
from compactml.task import call_model, describe


def check_finite(model: nn.Module) -> None:
    """Raise if any parameter or floating buffer holds NaN or Inf, naming the first one."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CompactMLError(
                f"weight {name} contains NaN or Inf values; repair or retrain the model "
                "before profiling or compressing it"
            )


def run_checked(
    model: nn.Module, inputs: Any, forward=None, what: str = "the example input"
) -> Any:
    """Run ``model`` on ``inputs`` without gradients; a failure becomes a one-line user error.

    A wrong shape or dtype surfaces deep inside torch as a long RuntimeError; the user needs to
    know that the input they gave does not fit, and what they gave.
    """
    try:
        with torch.no_grad():
            return forward(model, inputs) if forward is not None else call_model(model, inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise CompactMLError(
            f"the model cannot run on {what} {describe(inputs)} ({first_line(exc)}); "
            "pass an input shaped as the model expects, e.g. task.example_input()"
        ) from exc
