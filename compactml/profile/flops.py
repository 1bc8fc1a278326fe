"""Multiply-accumulates (MACs), counted by running the model once under FlopCounterMode.

``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of matmul-like ATen ops
(``mm``, ``addmm``, ``bmm``, convolutions, scaled dot-product attention) as 2 per
multiply-accumulate, so MACs = FLOPs / 2. Element-wise ops (activations, norms, bias adds)
are not counted, as is usual for MAC counts.

Per-module counts come from forward hooks that read the running total before and after each
module runs: that gives each module's *inclusive* MACs (its children included) and, by
subtracting what ran in the modules it called, its own. Fused CPU attention
(``_scaled_dot_product_flash_attention_for_cpu``), which FlopCounterMode does not count, is
counted as its two matmuls. The same pass records each module's output shape and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compactml.errors import CompactMLError
from compactml.task import call_model, primary_output, tensor_nbytes


@dataclass(frozen=True)
class ForwardTrace:
    """What one instrumented forward pass saw.

    ``total_macs`` is the whole model's MAC count. Keyed by module name (as in
    ``named_modules()``; ``""`` is the root): ``inclusive_macs`` (children included),
    ``module_macs`` (the module's own), ``output_shapes`` and ``output_bytes``.
    """

    total_macs: int
    inclusive_macs: dict[str, int]
    module_macs: dict[str, int]
    output_shapes: dict[str, list[int] | None]
    output_bytes: dict[str, int]


def _output_shape(output: Any) -> list[int] | None:
    try:
        return list(primary_output(output).shape)
    except CompactMLError:
        return None


def _global_flops(counter: FlopCounterMode) -> int:
    return sum(counter.get_flop_counts().get("Global", {}).values())


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """FLOPs of fused CPU attention: ``q @ k^T`` then ``scores @ v`` (FlopCounterMode lacks it)."""
    batch, heads, q_len, head_dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * q_len * k_len * (head_dim + v_dim)


def _counter() -> FlopCounterMode:
    extra = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        extra[cpu_attention] = _cpu_attention_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


def trace_forward(model: nn.Module, inputs: Any) -> ForwardTrace:
    """Run ``model`` once on ``inputs`` without gradients, counting MACs per module.

    A module's own MACs are those done while it is the innermost running module, so MACs in
    a container's own ``forward`` (attention matmuls) stay with it, and modules held in a
    ``ModuleList`` pass theirs to whichever module called them. The caller chooses the mode
    (profile runs it in eval mode); the model is not changed, and all hooks are removed.
    """
    names = {id(module): name for name, module in model.named_modules()}
    inclusive = dict.fromkeys(names.values(), 0)
    own = dict.fromkeys(names.values(), 0)
    shapes: dict[str, list[int] | None] = {}
    out_bytes: dict[str, int] = {}
    running: list[tuple[str, int]] = []  # (module name, FLOPs counted when it started)
    counter = _counter()

    def before(module: nn.Module, args: Any) -> None:
        running.append((names[id(module)], _global_flops(counter)))

    def after(module: nn.Module, args: Any, output: Any) -> None:
        name, start = running.pop()
        flops = _global_flops(counter) - start
        inclusive[name] += flops
        own[name] += flops
        if running:  # the caller's own count excludes what ran inside this module
            own[running[-1][0]] -= flops
        shapes.setdefault(name, _output_shape(output))
        out_bytes[name] = out_bytes.get(name, 0) + tensor_nbytes(output)

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
        module_macs={k: v // 2 for k, v in own.items()},
        output_shapes=shapes,
        output_bytes=out_bytes,
    )
