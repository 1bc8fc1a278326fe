"""The report's sensitivity section: the metric per layer and level, and the curves chart.

The section's data is ``SensitivityTable.to_dict()`` (see :mod:`compactml.sensitivity`): the
technique, ``level_name`` (``"sparsity"``, ``"bits"``, ...), ``levels``, ``metric``
(``"top1"``, ``"output_error"``, ...), ``higher_is_better``, ``baseline`` (the untouched
model's value), ``describe`` and ``rows``, one per layer and level with the layer's name, the
level, the metric, its ``damage`` and an ``error`` when the layer could not be compressed.
The table has one row per layer (in model order) and one column per level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compactml.errors import CompactMLError
from compactml.report.blocks import MISSING, Block, Bullets, Chart, Section, make_table, percent
from compactml.report.plots import SENSITIVITY_CHART, as_number, sensitivity_curves
from compactml.report.plots import sensitivity_grid as grid_of

FAILED = "failed"  # shown in a cell whose layer could not be compressed at that level
MAX_FAILURES = 20  # failures listed with their reason; the rest are counted
# Metrics that are shares (shown as percents); every other metric is shown as a plain number.
RATE_METRICS = frozenset({"top1", "top5", "agreement", "recall@1", "recall@10"})


def check_sensitivity(data: Any) -> None:
    """Raise CompactMLError unless ``data`` is None or has the layout of
    ``SensitivityTable.to_dict()``."""
    if data is None:
        return
    fix = "pass SensitivityTable.to_dict() or leave it out"
    if not isinstance(data, Mapping):
        raise CompactMLError(
            f"report field 'sensitivity' must be a dict or null, got {type(data).__name__}; {fix}"
        )
    for key in ("level_name", "metric"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise CompactMLError(f"report field 'sensitivity.{key}' must be a name; {fix}")
    rows = data.get("rows")
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        raise CompactMLError(f"report field 'sensitivity.rows' must be a list of rows; {fix}")
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping) or not isinstance(row.get("layer"), str):
            raise CompactMLError(
                f"report field 'sensitivity.rows[{index}]' must be a dict with a 'layer' "
                f"name; {fix}"
            )
    levels = data.get("levels")
    if levels is not None and (isinstance(levels, str) or not isinstance(levels, Sequence)):
        raise CompactMLError(f"report field 'sensitivity.levels' must be a list; {fix}")
    baseline = data.get("baseline")
    if baseline is not None and as_number(baseline) is None:
        raise CompactMLError(f"report field 'sensitivity.baseline' must be a number; {fix}")


def _value_text(metric: str, value: Any) -> str:
    number = as_number(value)
    if number is None:
        return MISSING
    return percent(number) if metric in RATE_METRICS else f"{number:.4f}"


def _cell(metric: str, row: Mapping[str, Any] | None) -> str:
    if row is None:
        return MISSING
    if row.get("error") is not None and as_number(row.get(metric)) is None:
        return FAILED
    return _value_text(metric, row.get(metric))


def _failures(data: Mapping[str, Any], grid: Mapping[str, Mapping[float, Any]]) -> list[Block]:
    level_name = data["level_name"]
    items = [
        f"{layer} at {level_name} {level:g}: {row['error']}"
        for layer, cells in grid.items()
        for level, row in cells.items()
        if row.get("error") is not None
    ]
    if not items:
        return []
    shown = items[:MAX_FAILURES]
    if len(items) > MAX_FAILURES:
        shown.append(f"... and {len(items) - MAX_FAILURES} more (see report.json)")
    return [
        f"Cells marked {FAILED}: the layer could not be compressed at that level.",
        Bullets(tuple(shown)),
    ]


def _intro(data: Mapping[str, Any]) -> list[str]:
    metric, level_name = data["metric"], data["level_name"]
    better = {True: "higher is better", False: "lower is better"}.get(data.get("higher_is_better"))
    text = (
        f"{data.get('technique') or 'The technique'} applied to one layer at a time, at each "
        f"level of {level_name}; every other layer left as it was. Each cell is the model's "
        f"{metric}"
    )
    text += f" ({better})." if better else "."
    lines = [
        text,
        f"Baseline, nothing compressed: {metric} {_value_text(metric, data.get('baseline'))}.",
    ]
    if data.get("describe"):
        lines.append(f"Damage is measured as the {data['describe']}.")
    return lines


def sensitivity_section(data: Mapping[str, Any] | None) -> Section | None:
    """The "Sensitivity" section: what was measured, the baseline, the layer x level table of
    the metric, the curves chart and the failures; None when there is no data."""
    levels, grid = grid_of(data)
    if not data or not grid:
        return None
    metric, level_name = data["metric"], data["level_name"]
    header = ("Layer", *(f"{level_name} {level:g}" for level in levels))
    rows = [
        (layer, *(_cell(metric, cells.get(level)) for level in levels))
        for layer, cells in grid.items()
    ]
    table = make_table(header, rows, (False,) + (True,) * len(levels))
    blocks: list[Block] = [*_intro(data), table]
    if sensitivity_curves(data):
        alt = f"{metric} against {level_name}, one curve per layer compressed alone"
        blocks.append(Chart(SENSITIVITY_CHART, alt))
    return Section("Sensitivity", (*blocks, *_failures(data, grid)))
