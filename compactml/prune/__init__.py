"""``prune(model, config, task=None)``: the pruning family's verb, and its configs.

The verb is thin: it checks that ``config`` is a pruning technique and calls
``config.apply(model, task)``. The criteria are pure functions in ``criteria.py``, masks are
buffers handled by ``masks.py``, ``unstructured.py`` holds ``Magnitude`` and ``Taylor``,
``nm.py`` holds ``NM``, ``calibrated.py`` ``SparseGPT`` and ``Wanda`` (calibrated block by
block on ``task.calib``), ``schedule.py`` the ``OneShot`` and ``Iterative`` schedules, and
``structured.py`` ``Channels`` and ``Heads``, which physically remove channels, neurons and
heads found as coupled groups by the dependency graph (``graph.py``, traced by ``trace.py``).
"""

from __future__ import annotations

from torch import nn

from compactml.config import Technique
from compactml.errors import CompactMLError
from compactml.prune.calibrated import SparseGPT, Wanda
from compactml.prune.graph import Graph, Group
from compactml.prune.masks import (
    Sparsity,
    apply_masks,
    attach_mask,
    keep_masks,
    remove_masks,
    sparsity,
)
from compactml.prune.nm import NM
from compactml.prune.schedule import Iterative, OneShot
from compactml.prune.structured import Channels, Heads
from compactml.prune.unstructured import Magnitude, Taylor
from compactml.task import Task

__all__ = [
    "Channels",
    "Graph",
    "Group",
    "Heads",
    "NM",
    "Iterative",
    "Magnitude",
    "OneShot",
    "SparseGPT",
    "Sparsity",
    "Taylor",
    "Wanda",
    "apply_masks",
    "attach_mask",
    "keep_masks",
    "prune",
    "remove_masks",
    "sparsity",
]


def prune(model: nn.Module, config: Technique, task: Task | None = None) -> nn.Module:
    """A pruned copy of ``model`` made by ``config`` (e.g. ``Magnitude(sparsity=0.5)``).

    ``task`` supplies training data to the configs that need it (Taylor scores, iterative
    schedules) and calibration data to SparseGPT and Wanda. ``model`` is never modified.
    """
    if not isinstance(config, Technique) or config.family != "prune":
        family = getattr(config, "family", None)
        what = f"a {family} technique" if family else f"a {type(config).__name__}"
        raise CompactMLError(
            f"prune() got {what}; pass a pruning config such as Magnitude(sparsity=0.5) or "
            "NM(n=2, m=4), or call the verb of that technique's family"
        )
    return config.apply(model, task)
