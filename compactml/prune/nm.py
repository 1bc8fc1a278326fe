"""N:M semi-structured pruning: ``NM(n=2, m=4)`` keeps n of every m consecutive input weights.

2:4 sparsity is what sparse tensor cores accelerate (Mishra et al. 2021, "Accelerating Sparse
Deep Neural Networks"); any criterion of :mod:`compactml.prune.criteria` ranks the weights
inside each group. Like unstructured pruning, the result is a mask buffer on each layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from compactml.config import Technique, record
from compactml.errors import CompactMLError
from compactml.prune import criteria
from compactml.prune.masks import attach_mask, sparsity
from compactml.prune.unstructured import masked_scores, select_layers
from compactml.task import Task

CRITERIA = ("magnitude", "taylor")


@dataclasses.dataclass(frozen=True)
class NM(Technique):
    """N:M sparsity: in every ``m`` consecutive weights along a layer's input dimension (for a
    convolution: input channels, at each output channel and kernel position) keep the ``n``
    most important, ranked by ``criterion``.

    Args:
        n: weights kept per group, 1 <= n <= m (``NM(2, 4)``: 50% sparse, 2 in every 4).
        m: group size; a layer whose input width is not divisible by ``m`` (a first
            convolution with 3 input channels, a depthwise convolution) is skipped, with a
            warning and a ``skipped`` entry in the model's history.
        criterion: ``"magnitude"`` (``|w|``) or ``"taylor"`` (``|w * dL/dw|`` over ``batches``
            batches of ``task.train``, Molchanov et al. 2019).
        batches: training batches for the Taylor criterion.
        include, exclude: fnmatch patterns on module names (Linear, Conv1d and Conv2d layers).

    Pruning is one-shot; fine-tune afterwards with ``cml.fine_tune`` (the masks are kept).
    """

    family: ClassVar[str] = "prune"
    level: ClassVar[str | None] = None
    n: int = 2
    m: int = 4
    criterion: str = "magnitude"
    batches: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("n", "m", "batches"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CompactMLError(f"NM {field} must be an integer >= 1, got {value!r}")
        if self.n > self.m:
            raise CompactMLError(
                f"NM n={self.n} is greater than m={self.m}; n weights are kept in every m, so "
                "use n <= m (e.g. n=2, m=4)"
            )
        if self.criterion not in CRITERIA:
            raise CompactMLError(
                f"criterion={self.criterion!r} is not known; use one of {', '.join(CRITERIA)}"
            )

    def _divisible(self, name: str, layer: nn.Module) -> str | None:
        width = layer.weight.shape[1]
        if width % self.m:
            return f"input width {width} is not divisible by m={self.m}"
        return None

    def scores(self, model: nn.Module, names: list[str], task: Task | None) -> dict[str, Any]:
        """The criterion's score of every weight of the layers ``names``."""
        if self.criterion == "taylor":
            if not (isinstance(task, Task) and task.has("train")):
                raise CompactMLError(
                    "NM(criterion='taylor') scores weights with gradients from task.train; pass "
                    "prune(model, NM(...), task) with a Task(train=...)"
                )
            return criteria.taylor_scores(model, task, names, self.batches)
        return {n: criteria.magnitude_scores(model.get_submodule(n).weight) for n in names}

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A copy of ``model`` with an N:M mask on each selected layer whose input width is
        divisible by ``m``; ``model`` is unchanged."""
        new = self.copy_model(model)
        names, skipped = select_layers(self, new, self._divisible)
        raw = self.scores(new, names, task)
        for name in names:
            layer = new.get_submodule(name)
            attach_mask(layer, criteria.nm_mask(masked_scores(layer, raw[name]), self.n, self.m))
        report = sparsity(new)
        layers = {name: round(report.layers[name], 6) for name in names}
        record(new, self, names, skipped, {"sparsity": layers})
        return new
