"""Charts for the report: stored bytes per layer, top-1 accuracy versus input noise, and
per-layer sensitivity curves.

Drawn with matplotlib's object API (``Figure`` on an Agg canvas), never pyplot, and imported
only when a chart is drawn: nothing here touches matplotlib's global state or the backend a
user's program has chosen. Each chart comes back as PNG bytes, which the writer saves beside
the Markdown report and the HTML report embeds.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

PER_LAYER_CHART = "per_layer_size.png"
NOISE_CHART = "accuracy_vs_noise.png"
SENSITIVITY_CHART = "sensitivity.png"
CHARTS = (PER_LAYER_CHART, NOISE_CHART, SENSITIVITY_CHART)  # every chart a report can have
TOP_LAYERS = 25  # the per-layer chart shows at most this many layers, the largest
_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
_LABEL_CHARS = 48  # longer layer labels are shortened in the middle


def as_number(value: Any) -> float | None:
    """``value`` as a float when it is a number (bools and strings are not), else None."""
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def byte_unit(n: float) -> tuple[float, str]:
    """The divisor and binary unit (``B``, ``KiB`` ... ``PiB``) that show ``n`` bytes best.

    The largest unit in which ``|n|`` rounds (two decimals) below 1024: 1536 -> (1024.0, "KiB").
    Used by ``sections.human_bytes`` and by the per-layer chart's axis.
    """
    value = abs(float(n))
    if value < 1024:
        return 1.0, "B"
    divisor = 1.0
    for unit in _BYTE_UNITS:
        divisor *= 1024
        if round(value / divisor, 2) < 1024 or unit == _BYTE_UNITS[-1]:
            return divisor, unit
    raise AssertionError("unreachable")


def layer_list(profile: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The profile's per-layer entries (dicts only); empty when there are none."""
    layers = (profile or {}).get("layers") or []
    return [layer for layer in layers if isinstance(layer, Mapping)]


def noise_points(metrics: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The metrics' accuracy-under-noise points (dicts with sigma and top1); empty when absent."""
    points = (metrics or {}).get("noise") or []
    return [point for point in points if isinstance(point, Mapping)]


def sensitivity_grid(data: Any) -> tuple[list[float], dict[str, dict[float, Mapping[str, Any]]]]:
    """The levels and the rows (by layer, then level) of a report's ``sensitivity`` section,
    which is ``SensitivityTable.to_dict()``; empty when absent. Levels keep the order given
    in ``levels``, then the order of the rows; layers keep the order of the rows."""
    if not isinstance(data, Mapping):
        return [], {}
    level_name = data.get("level_name")
    levels = [x for x in map(as_number, data.get("levels") or []) if x is not None]
    grid: dict[str, dict[float, Mapping[str, Any]]] = {}
    for row in data.get("rows") or []:
        if not isinstance(row, Mapping) or not isinstance(row.get("layer"), str):
            continue
        level = as_number(row.get(level_name))
        if level is None:
            continue
        grid.setdefault(row["layer"], {})[level] = row
        if level not in levels:
            levels.append(level)
    return levels, grid


def sensitivity_curves(data: Any) -> dict[str, list[tuple[float, float | None]]]:
    """Layer -> its ``(level, metric)`` points, most sensitive layer (largest damage at any
    level) first, from a report's ``sensitivity`` section; layers without a single measured
    value (they failed at every level) are left out."""
    levels, grid = sensitivity_grid(data)
    metric = data.get("metric") if isinstance(data, Mapping) else None
    curves, worst = {}, {}
    for layer, cells in grid.items():
        points = [(lv, as_number(cells[lv].get(metric)) if lv in cells else None) for lv in levels]
        if any(value is not None for _, value in points):
            curves[layer] = points
            damages = [as_number(row.get("damage")) for row in cells.values()]
            worst[layer] = max((d for d in damages if d is not None), default=-math.inf)
    return {layer: curves[layer] for layer in sorted(curves, key=lambda name: -worst[name])}


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure (inches) on its own Agg canvas, without pyplot or global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _plain(text: Any) -> str:
    """``text`` shown literally: a ``$`` would otherwise start matplotlib's math mode."""
    text = str(text)
    if len(text) > _LABEL_CHARS:
        half = (_LABEL_CHARS - 1) // 2
        text = text[:half] + "…" + text[-half:]
    return text.replace("$", r"\$")


def per_layer_size_png(layers: Sequence[Mapping[str, Any]], top: int = TOP_LAYERS) -> bytes:
    """Horizontal bars of stored bytes per layer, largest first, at most ``top`` layers (PNG)."""
    entries = sorted(
        ((as_number(layer.get("stored_bytes")) or 0.0, layer) for layer in layers),
        key=lambda entry: entry[0],
        reverse=True,
    )[:top]
    divisor, unit = byte_unit(max((size for size, _ in entries), default=0.0))
    labels = [
        _plain(f"{layer.get('name', '?')} ({layer.get('type', '?')})") for _, layer in entries
    ]
    figure = _figure(8.0, 1.4 + 0.28 * len(entries))
    axes = figure.add_subplot()
    axes.barh(range(len(entries)), [size / divisor for size, _ in entries], color="#4c72b0")
    axes.set_yticks(range(len(entries)), labels=labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(f"stored size ({unit})")
    shown = f" (largest {top} of {len(layers)})" if len(layers) > top else ""
    axes.set_title(f"Stored size per layer{shown}")
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def _curve(points: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Sigma and top-1 (in percent) of the points that have both, sorted by sigma."""
    pairs = sorted(
        (as_number(point.get("sigma")), as_number(point.get("top1")))
        for point in points
        if as_number(point.get("sigma")) is not None and as_number(point.get("top1")) is not None
    )
    return [sigma for sigma, _ in pairs], [top1 * 100 for _, top1 in pairs]


def accuracy_vs_noise_png(
    points: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]] = ()
) -> bytes:
    """Top-1 accuracy (%) against input noise sigma, with the original model's line if given."""
    figure = _figure(6.0, 4.0)
    axes = figure.add_subplot()
    sigmas, accuracy = _curve(points)
    axes.plot(sigmas, accuracy, "o-", color="#4c72b0", label="compressed")
    if reference:
        ref_sigmas, ref_accuracy = _curve(reference)
        axes.plot(ref_sigmas, ref_accuracy, "s--", color="#dd8452", label="original")
        axes.legend()
    axes.set_xlabel("noise sigma (standard deviation added to the input)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title("Accuracy under input noise")
    axes.grid(alpha=0.3)
    return _png(figure)


def _points(curve: Sequence[tuple[Any, Any]]) -> tuple[list[float], list[float]]:
    """The curve's points sorted by level; a missing or non-numeric value becomes NaN, which
    leaves a gap in the line."""
    pairs = [(as_number(level), as_number(value)) for level, value in curve]
    pairs = sorted((p for p in pairs if p[0] is not None), key=lambda p: p[0])
    return [x for x, _ in pairs], [math.nan if y is None else y for _, y in pairs]


def sensitivity_png(
    curves: Mapping[str, Sequence[tuple[Any, Any]]],
    *,
    level_name: str = "level",
    metric_name: str = "metric",
    baseline: float | None = None,
    title: str = "Sensitivity per layer",
    order: Sequence[str] | None = None,
    top: int = 10,
) -> bytes:
    """Sensitivity curves (PNG): one line per layer, x = level, y = the metric with only that
    layer compressed at that level, and the untouched model's ``baseline`` as a dashed line.

    ``curves`` maps a layer name to its ``(level, value)`` points (None or NaN values, e.g.
    failures, leave gaps). With more than ``top`` layers, the first ``top`` of ``order`` (most
    sensitive first; default: the order of ``curves``) are coloured and named in the legend
    and the rest are drawn as thin grey lines.
    """
    names = [n for n in (order or curves) if n in curves]
    names += [n for n in curves if n not in names]
    named = names[:top]
    figure = _figure(9.0, 5.0)
    axes = figure.add_subplot()
    for name in reversed(names[top:]):  # grey lines underneath the coloured ones
        axes.plot(*_points(curves[name]), "-", color="#b0b0b0", linewidth=0.8)
    colors = _colors(len(named))
    for name, color in zip(named, colors, strict=True):
        axes.plot(*_points(curves[name]), "o-", color=color, markersize=3, label=_plain(name))
    baseline = as_number(baseline)
    if baseline is not None and math.isfinite(baseline):
        axes.axhline(baseline, color="black", linestyle="--", linewidth=1, label="baseline")
    levels = sorted({x for name in names for x in _points(curves[name])[0]})
    if 0 < len(levels) <= 12:
        axes.set_xticks(levels, labels=[f"{x:g}" for x in levels])
    axes.set_xlabel(_plain(level_name))
    axes.set_ylabel(_plain(metric_name))
    shown = f" ({top} most sensitive of {len(names)} named)" if len(names) > top else ""
    axes.set_title(str(title).replace("$", r"\$") + shown, fontsize=10)
    axes.grid(alpha=0.3)
    if named or baseline is not None:
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(figure)


def _colors(count: int) -> list[Any]:
    """``count`` colours from matplotlib's tab10 map (tab20 beyond ten)."""
    from matplotlib import colormaps

    cmap, size = (colormaps["tab10"], 10) if count <= 10 else (colormaps["tab20"], 20)
    return [cmap(i % size) for i in range(count)]


def render_charts(report: Mapping[str, Any]) -> dict[str, bytes]:
    """Every chart the report has data for, as {file name: PNG bytes}; empty when none."""
    charts = {}
    layers = layer_list(report.get("profile"))
    if layers:
        charts[PER_LAYER_CHART] = per_layer_size_png(layers)
    points = noise_points(report.get("metrics"))
    if points:
        reference = noise_points(report.get("reference_metrics"))
        charts[NOISE_CHART] = accuracy_vs_noise_png(points, reference)
    curves = sensitivity_curves(report.get("sensitivity"))
    if curves:
        data = report["sensitivity"]
        charts[SENSITIVITY_CHART] = sensitivity_png(
            curves,
            level_name=str(data.get("level_name")),
            metric_name=str(data.get("metric")),
            baseline=data.get("baseline"),
            title=f"{data.get('technique', 'Technique')}: {data.get('metric')} with one layer "
            "compressed at a time",
        )
    return charts
