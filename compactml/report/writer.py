"""Write a report folder: report.json, report.md, report.html and the charts, each atomically."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compactml.errors import CompactMLError
from compactml.io import atomic_write_bytes, atomic_write_text
from compactml.report.html import render_html
from compactml.report.markdown import render_markdown
from compactml.report.plots import CHARTS, render_charts
from compactml.report.sections import check_report


def to_jsonable(value: Any, where: str = "report") -> Any:
    """A copy of ``value`` made of dicts, lists, str, int, float, bool and None only.

    numpy and torch scalars and arrays become Python numbers and lists (through ``tolist``),
    tuples become lists, paths become strings, dict keys become strings. NaN, Inf and types
    JSON cannot hold raise CompactMLError naming where in the report they are.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CompactMLError(
                f"{where} is {value}, which JSON cannot hold; fix the measurement that "
                "produced it or leave the value out of the report"
            )
        return float(value)
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return to_jsonable(value.tolist(), where)
    raise CompactMLError(
        f"{where} is a {type(value).__name__}, which JSON cannot hold; convert it to a number, "
        "string, list or dict before writing the report"
    )


def report_json(report: Mapping[str, Any]) -> str:
    """The report as indented JSON with sorted keys; NaN and Inf raise CompactMLError."""
    check_report(report)
    return json.dumps(to_jsonable(report), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the charts into ``out_dir``.

    The folder is created if missing. Each file is written atomically and replaces a previous
    one of the same name; a chart left by an earlier report that this one has no data for is
    removed, so report.md never sits beside a stale chart. Returns the paths as
    ``{"json", "markdown", "html"}`` plus one entry per chart, keyed by its file stem
    (``"per_layer_size"``, ``"accuracy_vs_noise"``, ``"sensitivity"``).
    """
    text = report_json(report)  # validates, and fails before anything is written
    data = json.loads(text)
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise CompactMLError(f"report folder {folder} is a file; give a folder path (-o)")
    folder.mkdir(parents=True, exist_ok=True)
    charts = render_charts(data)
    chart_paths = {
        Path(name).stem: atomic_write_bytes(folder / name, charts[name]) for name in charts
    }
    for stale in set(CHARTS) - set(charts):
        with contextlib.suppress(FileNotFoundError):
            (folder / stale).unlink()
    paths = {
        "json": atomic_write_text(folder / "report.json", text),
        "markdown": atomic_write_text(folder / "report.md", render_markdown(data)),
        "html": atomic_write_text(folder / "report.html", render_html(data, charts)),
    }
    return {**paths, **chart_paths}
