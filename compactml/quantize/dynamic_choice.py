"""``Dynamic(per_tensor="auto")``: choose from calibration data which layers quantize their
input per tensor.

A per-tensor activation scale (ONNX ``DynamicQuantizeLinear``) is cheaper at run time than one
scale per token: ONNX Runtime fuses it with the integer matmul and the bias into one
``DynamicQuantizeMatMul``, and the layers reading one tensor (q, k and v; gate and up) share a
single quantization of it. It is less exact where the tokens' ranges differ, which is common
after GELU and in attention outputs. The choice is made in two steps, both on ``task.calib``:

1. **Cost per layer.** One pass with every layer per token. For each layer and its actual
   input ``x``, the cost is what per-tensor quantization adds to the layer's relative output
   error: ``(||(q_tensor(x) - x) W^T||^2 - ||(q_token(x) - x) W^T||^2) / ||y||^2``, with ``W``
   the dequantized int8 weight (only activation error counts) and ``y`` the layer's output,
   summed over the batches. Layers called one after the other on the same tensor object form
   a group that is decided together (its cost is its worst member's): in the exported graph
   their quantization nodes are identical, and ONNX Runtime merges them into one. Errors
   count real tokens only (the batch's ``attention_mask``); a layer that never ran, or whose
   cost is not finite, stays per token and is listed as such.
2. **Cheapest first, within the tolerance.** Groups are sorted by cost. A set of groups *fits*
   when the model with them per tensor has a relative output error against the float model
   (``sum ||f - f_ref||^2 / sum ||f_ref||^2``, as in sensitivity scans) of at most
   ``(1 + tolerance)`` times the all-per-token model's. Bisection finds the longest prefix of
   the order that fits (about ``log2(groups) + 1`` candidates). The error does not grow quite
   monotonically along the order (quantization errors of different layers partly cancel), so
   the groups after that prefix are then tried one at a time, each kept if the set still fits,
   until :data:`PATIENCE` in a row do not.

On all-MiniLM-L6-v2 with its 128 calibration sentences (``benchmarks/dynamic_int8.py``; about
a minute on 2 cores, 13-14 candidates) the default tolerance puts every attention projection
(q, k, v and the output) per tensor, with the pooler and two or three feed-forward layers of
the last blocks, and leaves the other feed-forward layers per token: output error +6% to +10%,
cosine fidelity 0.9975 against 0.9977 all per token. ``calib_batches`` bounds the time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.calib.capture import run_checked, token_mask
from compactml.errors import CompactMLError
from compactml.progress import progress_bar
from compactml.quantize.dynamic import (
    DynamicQuantLinear,
    fake_quantize_tensor,
    fake_quantize_tokens,
)
from compactml.sensitivity.measures import OutputError
from compactml.task import Task, eval_mode, split_batch

WHO = "Dynamic(per_tensor='auto')"
#: Consecutive groups that do not fit after which the one-by-one extension stops.
PATIENCE = 2


class _Costs:
    """Forward hooks that add up each layer's cost and group the layers sharing an input.

    Errors are summed over the real tokens of the batch (``new_batch``'s mask; padding
    positions still take part in the per-tensor range, as they do at run time)."""

    def __init__(self, layers: dict[str, DynamicQuantLinear]) -> None:
        self.sums = {name: torch.zeros(3, dtype=torch.float64) for name in layers}
        self.calls = dict.fromkeys(layers, 0)
        self.parent = {name: name for name in layers}
        self._last: tuple[torch.Tensor, str] | None = None
        self._mask: torch.Tensor | None = None
        self.handles = [
            layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()
        ]

    def new_batch(self, inputs: Any) -> None:
        """Start a batch: its real-token mask; no group spans two batches."""
        self._last, self._mask = None, token_mask(inputs)

    def _root(self, name: str) -> str:
        while self.parent[name] != name:
            name = self.parent[name]
        return name

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is None or t.dim() < 3 or tuple(t.shape[:2]) != tuple(mask.shape):
            return t
        return t[mask.to(t.device)]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: DynamicQuantLinear, args: tuple, output: Any) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.parent[self._root(name)] = self._root(self._last[1])
            self._last = (x, name)
            xf, w = x.float(), module.weight.float()
            # the output errors are the weight times the input errors: two matmuls
            token = self._rows(F.linear(fake_quantize_tokens(xf) - xf, w))
            tensor = self._rows(F.linear(fake_quantize_tensor(xf) - xf, w))
            norm = self._rows(output.float()).square().sum()
            self.sums[name] += torch.stack([token.square().sum(), tensor.square().sum(), norm])
            self.calls[name] += 1

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._last = self._mask = None

    def cost(self, name: str) -> float:
        """The layer's added relative error; ``inf`` when it never ran or is not finite."""
        token, tensor, norm = (float(v) for v in self.sums[name])
        value = (tensor - token) / max(norm, 1e-30) if self.calls[name] else math.inf
        return value if math.isfinite(value) else math.inf

    def groups(self) -> tuple[list[list[str]], list[str]]:
        """Groups of layer names (model order), cheapest first, and the layers left out of
        the choice because they never ran on the calibration data or their cost is not
        finite (they stay per token)."""
        found: dict[str, list[str]] = {}
        for name in self.parent:
            found.setdefault(self._root(name), []).append(name)
        costs = {root: max(self.cost(n) for n in group) for root, group in found.items()}
        usable = [found[root] for root in sorted(found, key=costs.get) if costs[root] < math.inf]
        left = [n for root, group in found.items() if costs[root] == math.inf for n in group]
        return usable, left


def check_task(task: Task | None) -> None:
    """Raise a CompactMLError unless ``task`` has calibration batches."""
    if not isinstance(task, Task) or not task.has("calib"):
        raise CompactMLError(
            f"{WHO} chooses layers from calibration data; pass a Task with calib batches, or "
            "give per_tensor as module-name patterns"
        )


def _measure_costs(
    model: nn.Module, layers: dict[str, DynamicQuantLinear], task: Task, batches: int | None,
    progress: bool,
) -> _Costs:  # fmt: skip
    """Run ``model`` (every layer per token) over the calibration batches with cost hooks."""
    data = list(task.batches("calib", batches))
    if not data:
        raise CompactMLError(f"the task's calib data is empty; {WHO} needs calibration batches")
    costs = _Costs(layers)
    try:
        with eval_mode(model), torch.inference_mode():
            for batch in progress_bar(data, f"{WHO}: layer costs", enabled=progress):
                inputs = split_batch(batch)[0]
                costs.new_batch(inputs)
                run_checked(model, task, inputs, WHO)
    finally:
        costs.remove()
    return costs


def choose_per_tensor(
    reference: nn.Module,
    model: nn.Module,
    layers: dict[str, DynamicQuantLinear],
    task: Task | None,
    tolerance: float,
    batches: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Set ``activation="tensor"`` on as many of ``layers``' groups as fit, cheapest first:
    ``model``'s output error against ``reference`` (the float model) stays within
    ``(1 + tolerance)`` of the all-per-token error (see the module docstring).

    ``model`` holds ``layers`` (all per token on entry) and is changed in place. Returns a
    JSON-able summary for the model's history: the names set per tensor (model order) under
    ``per_tensor``, and the errors measured under ``selection``.
    """
    check_task(task)
    costs = _measure_costs(model, layers, task, batches, progress)
    order, left_out = costs.groups()
    scorer = OutputError(reference, task, batches)

    def choose(selected: set[int]) -> None:
        for i, group in enumerate(order):
            for name in group:
                layers[name].activation = "tensor" if i in selected else "token"

    def error(selected: set[int]) -> float:
        choose(selected)
        return scorer.value(model)

    base = error(set())
    if not math.isfinite(base):
        raise CompactMLError(
            f"{WHO}: the output error of the per-token model on task.calib is not finite "
            f"({base}); check that the model's outputs on the calibration batches are finite, "
            "or give per_tensor as module-name patterns"
        )
    limit = base * (1.0 + tolerance)
    evaluated = 1

    def fits(value: float) -> bool:
        return math.isfinite(value) and value <= limit

    # 1. Bisection over prefixes: ``good`` fits (the empty prefix does), ``bad`` does not.
    good, bad, best = 0, len(order) + 1, base
    candidates = [len(order)] if order else []
    while candidates:
        count = candidates.pop()
        value = error(set(range(count)))
        evaluated += 1
        if fits(value):
            good, best = count, value
        else:
            bad = count
        if bad - good > 1:
            candidates.append((good + bad) // 2)
    # 2. The error is not quite monotonic along the order: past the first group that does not
    # fit, try the next ones one by one, until PATIENCE in a row do not fit.
    selected, misses = set(range(good)), 0
    for i in range(good + 1, len(order)):
        value = error(selected | {i})
        evaluated += 1
        if fits(value):
            selected.add(i)
            best, misses = value, 0
        else:
            misses += 1
            if misses == PATIENCE:
                break
    choose(selected)
    return {
        "per_tensor": [name for name in layers if layers[name].activation == "tensor"],
        "selection": {
            "measure": scorer.describe,
            "output_error_per_token": base,
            "output_error": best,
            "tolerance": tolerance,
            "groups": len(order),
            "groups_per_tensor": len(selected),
            "candidates_evaluated": evaluated,
            "left_per_token": left_out,
        },
    }
