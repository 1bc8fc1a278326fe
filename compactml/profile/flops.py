"""Multiply-accumulates (MACs), counted by running the model once under FlopCounterMode.

``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of matmul-like ATen ops
(``mm``, ``addmm``, ``bmm``, convolutions, scaled dot-product attention) as 2 per
multiply-accumulate, so MACs = FLOPs / 2. Element-wise ops (activations, norms, bias adds)
are not counted, as is usual for MAC counts.

Per-module counts come from forward hooks that read the running total before and after each
module runs: that gives each module's *inclusive* MACs (its children included), and
:func:`exclusive_macs` subtracts the children. The same pass records each module's output shape
and output bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from compactml.errors import CompactMLError
from compactml.task import call_model, primary_output


@dataclass(frozen=True)
class ForwardTrace:
    """What one instrumented forward pass saw.

    ``total_macs`` is the whole model's MAC count; ``inclusive_macs``, ``output_shapes`` and
    ``output_bytes`` are keyed by module name (as in ``named_modules()``; ``""`` is the root).
    """

    total_macs: int
    inclusive_macs: dict[str, int]
    output_shapes: dict[str, list[int] | None]
    output_bytes: dict[str, int]


def _output_shape(output: Any) -> list[int] | None:
    try:
        return list(primary_output(output).shape)
    except CompactMLError:
        return None


def _output_bytes(output: Any) -> int:
    leaves = tree_leaves(output)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _global_flops(counter: FlopCounterMode) -> int:
    return sum(counter.get_flop_counts().get("Global", {}).values())


def trace_forward(model: nn.Module, inputs: Any) -> ForwardTrace:
    """Run ``model`` once on ``inputs`` without gradients, counting MACs per module.

    The caller chooses the mode (profile runs it in eval mode); the model is not changed, and
    all hooks are removed afterwards.
    """
    names = {id(module): name for name, module in model.named_modules()}
    inclusive = dict.fromkeys(names.values(), 0)
    shapes: dict[str, list[int] | None] = {}
    out_bytes: dict[str, int] = {}
    started: dict[int, list[int]] = {}
    counter = FlopCounterMode(display=False)

    def before(module: nn.Module, args: Any) -> None:
        started.setdefault(id(module), []).append(_global_flops(counter))

    def after(module: nn.Module, args: Any, output: Any) -> None:
        name = names[id(module)]
        inclusive[name] += _global_flops(counter) - started[id(module)].pop()
        shapes.setdefault(name, _output_shape(output))
        out_bytes[name] = out_bytes.get(name, 0) + _output_bytes(output)

    handles = []
    for module in {id(m): m for m in model.modules()}.values():
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    try:
        with torch.no_grad(), counter:
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ForwardTrace(
        total_macs=counter.get_total_flops() // 2,
        inclusive_macs={k: v // 2 for k, v in inclusive.items()},
        output_shapes=shapes,
        output_bytes=out_bytes,
    )


def exclusive_macs(model: nn.Module, inclusive: dict[str, int]) -> dict[str, int]:
    """MACs each module does itself: its inclusive count minus its direct children's."""
    names = {id(module): name for name, module in model.named_modules()}
    result = {}
    for name, module in model.named_modules():
        children = {names[id(child)] for child in module.children()}
        own = inclusive.get(name, 0) - sum(inclusive.get(child, 0) for child in children)
        result[name] = max(own, 0)
    return result
