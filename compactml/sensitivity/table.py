"""``SensitivityTable``: what a sensitivity scan measured, with its ranking, rows and curves."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from compactml.errors import CompactMLError
from compactml.io import atomic_write_bytes


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
    """What :func:`sensitivity` measured.

    Attributes:
        technique: the technique's class name, e.g. ``"WeightOnly"``.
        level_name: the field that was varied (``"bits"``, ``"sparsity"``; ``"level"`` when a
            function made the technique).
        levels: the levels, in the order given.
        measure: ``"metric"`` or ``"output"``.
        metric: the measured quantity's name (``"top1"``, ``"perplexity"``, the first key of a
            custom callable, ``"output_error"``).
        higher_is_better: whether a larger ``metric`` is better.
        baseline: the untouched model's value of ``metric``.
        values: layer -> level -> the metric with only that layer compressed at that level.
        failures: layer -> level -> why the technique could not compress that layer at that
            level (it raised a CompactMLError, or recorded the layer as skipped).
        describe: what a damage number is, e.g. ``"top1 drop on 8 eval batches"``.
    """

    technique: str
    level_name: str
    levels: tuple[float, ...]
    measure: str
    metric: str
    higher_is_better: bool
    baseline: float
    values: dict[str, dict[float, float]]
    failures: dict[str, dict[float, str]]
    describe: str

    @property
    def layers(self) -> list[str]:
        """The layers measured, in model order."""
        return list(self.values)

    def damage(self, layer: str, level: float) -> float:
        """How much compressing ``layer`` at ``level`` hurt: the metric's drop from the
        baseline (its rise for lower-is-better metrics), the output error for ``"output"``;
        ``inf`` when the model's outputs were not finite; KeyError when not measured."""
        value = self.values[layer][level]
        if not math.isfinite(value):
            return math.inf
        if self.measure == "output":
            return value
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def ranking(self, level: float) -> list[str]:
        """Layers from least to most sensitive at ``level`` (by :meth:`damage`; ties keep
        model order). Layers that failed at that level are left out."""
        if level not in self.levels:
            raise CompactMLError(
                f"level {level!r} was not measured; use one of {list(self.levels)}"
            )
        measured = [name for name in self.values if level in self.values[name]]
        return sorted(measured, key=lambda name: self.damage(name, level))

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-able row per (layer, level), for reports: ``layer``, the level under its
        name (e.g. ``bits``), the metric under its name (e.g. ``top1``), ``damage`` and
        ``error`` (None, the failure's message, or a note that the value was not finite, in
        which case the metric and damage are None)."""
        rows = []
        for name in self.values:
            for level in self.levels:
                value, error = self.values[name].get(level), self.failures.get(name, {}).get(level)
                if value is not None and not math.isfinite(value):
                    error, value = f"{self.metric} was {value} (not finite)", None
                damage = None if value is None else self.damage(name, level)
                row = {"layer": name, self.level_name: level, self.metric: value}
                rows.append(row | {"damage": damage, "error": error})
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The table as plain JSON-able data (non-finite numbers become None)."""
        baseline = self.baseline if math.isfinite(self.baseline) else None
        return {
            "technique": self.technique,
            "level_name": self.level_name,
            "levels": list(self.levels),
            "measure": self.measure,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "baseline": baseline,
            "describe": self.describe,
            "rows": self.rows(),
        }

    def png(self) -> bytes:
        """The curves as PNG bytes (see :func:`compactml.report.plots.sensitivity_png`); the
        most sensitive layers (largest damage at any level) are named, layers that failed at
        every level are left out."""
        from compactml.report.plots import sensitivity_png  # matplotlib only when drawing

        measured = [name for name in self.values if self.values[name]]
        curves = {
            name: [(level, self.values[name].get(level, math.nan)) for level in self.levels]
            for name in measured
        }
        worst = {name: max(self.damage(name, lv) for lv in self.values[name]) for name in measured}
        return sensitivity_png(
            curves,
            level_name=self.level_name,
            metric_name=self.metric,
            baseline=self.baseline,
            title=f"{self.technique}: {self.metric} with one layer compressed at a time",
            order=sorted(worst, key=lambda name: -worst[name]),
        )

    def plot(self, path: str | os.PathLike) -> Path:
        """Write the curves (one line per layer, x = level, y = metric) to ``path`` as a PNG,
        atomically, and return the path."""
        return atomic_write_bytes(path, self.png())
