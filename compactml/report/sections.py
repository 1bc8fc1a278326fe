"""The report as a document: number formats and the sections every output format shares.

``build_sections`` turns a report dict into sections of paragraphs, bullet lists, tables and
chart references; ``compactml.report.markdown``, ``compactml.report.html`` and
``compactml.report.console`` render the very same sections, so the formats never disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from compactml.errors import CompactMLError
from compactml.report.blocks import (
    MISSING,
    Block,
    Bullets,
    Chart,
    Section,
    Table,
    percent,
)
from compactml.report.blocks import make_table as _table
from compactml.report.plots import (
    NOISE_CHART,
    PER_LAYER_CHART,
    TOP_LAYERS,
    byte_unit,
    layer_list,
    noise_points,
)
from compactml.report.plots import as_number as _num
from compactml.report.sensitivity import check_sensitivity, sensitivity_section

_COUNT_UNITS = ("K", "M", "G", "T", "P")


def human_bytes(n: float) -> str:
    """A byte count in binary units: 512 -> "512 B", 1536 -> "1.50 KiB", 1572864 -> "1.50 MiB".

    Negative counts (a margin that is short) keep their sign: -2048 -> "-2.00 KiB".
    """
    divisor, unit = byte_unit(n)
    value = float(n)
    if unit == "B":
        return f"{int(value)} B" if value == int(value) else f"{value:.2f} B"
    return f"{value / divisor:.2f} {unit}"


def human_count(n: float) -> str:
    """A count in decimal units: 999 -> "999", 1234 -> "1.2 K", 1_200_000 -> "1.2 M"."""
    value = float(n)
    if abs(value) < 1000:
        return f"{int(value)}" if value == int(value) else f"{value:.1f}"
    for unit in _COUNT_UNITS:
        value /= 1000
        if abs(round(value, 1)) < 1000 or unit == _COUNT_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_energy(microjoules: float) -> str:
    """An energy in µJ, mJ or J: 1500.0 -> "1.50 mJ"."""
    value = float(microjoules)
    if abs(value) < 1e3:
        return f"{value:.2f} µJ"
    if abs(value) < 1e6:
        return f"{value / 1e3:.2f} mJ"
    return f"{value / 1e6:.2f} J"


def exact_bytes(n: int) -> str:
    """A byte count in human units followed by the exact count: "1.50 KiB (1,536 bytes)"."""
    return f"{human_bytes(n)} ({int(n):,} bytes)"


def check_report(report: Any) -> None:
    """Raise CompactMLError unless ``report`` has the layout ``write_report`` documents."""
    if not isinstance(report, Mapping):
        raise CompactMLError(
            f"report must be a dict, got {type(report).__name__}; pass the dict the CLI builds"
        )
    for key in ("title", "model"):
        if not isinstance(report.get(key), str):
            raise CompactMLError(f"report field '{key}' must be a string; set report['{key}']")
    for key in ("profile", "metrics", "reference_metrics", "artifact"):
        if report.get(key) is not None and not isinstance(report[key], Mapping):
            raise CompactMLError(
                f"report field '{key}' must be a dict or null, got {type(report[key]).__name__}; "
                "pass the section's dict or leave it out"
            )
    check_sensitivity(report.get("sensitivity"))
    notes = report.get("notes")
    if notes is not None and (isinstance(notes, str) or not isinstance(notes, Sequence)):
        raise CompactMLError("report field 'notes' must be a list of strings; wrap a note in [...]")


_STYLE = {"rate": percent, "count": lambda x: f"{int(x):,}", "float": lambda x: f"{x:.4f}"}
_DIFF = {"rate": lambda d: f"{d * 100:+.2f} pp", "count": lambda d: f"{int(d):+,}"}
_DIFF["float"] = lambda d: f"{d:+.4f}"
_HEADLINE = {  # per metrics kind: (key, label, style), in the order shown
    "classification": (
        ("samples", "Samples", "count"),
        ("top1", "Top-1 accuracy", "rate"),
        ("top5", "Top-5 accuracy", "rate"),
        ("agreement", "Top-1 agreement with original", "rate"),
        ("nll", "Negative log-likelihood (nats)", "float"),
        ("ece", "Expected calibration error", "rate"),
        ("brier", "Brier score", "float"),
    ),
    "embedding": (
        ("queries", "Queries", "count"),
        ("recall@1", "Recall@1", "rate"),
        ("recall@10", "Recall@10", "rate"),
        ("mrr", "Mean reciprocal rank", "float"),
        ("cosine_fidelity", "Cosine fidelity to original (mean)", "float"),
        ("cosine_fidelity_min", "Cosine fidelity to original (min)", "float"),
    ),
    "language_model": (
        ("tokens", "Tokens", "count"),
        ("nll", "Negative log-likelihood (nats/token)", "float"),
        ("perplexity", "Perplexity", "float"),
    ),
}
_NOT_HEADLINE = {"kind", "per_class_accuracy", "noise"}


def _fmt(value: Any, fmt: Callable[[float], str]) -> str:
    number = _num(value)
    return MISSING if number is None else fmt(number)


def _overview(report: Mapping[str, Any]) -> Section:
    items = [f"Model: {report['model']}"]
    if report.get("created"):
        items.append(f"Created: {report['created']}")
    if report.get("compactml_version"):
        items.append(f"compactml version: {report['compactml_version']}")
    return Section("Overview", (Bullets(tuple(items)),))


def _latency_text(latency: Mapping[str, Any]) -> str:
    def ms(key: str) -> str:
        return _fmt(latency.get(key), lambda x: f"{x:.3f} ms")

    text = f"{ms('median_ms')} median (p10 {ms('p10_ms')}, p90 {ms('p90_ms')})"
    details = [
        f"{latency['threads']} thread(s)" if "threads" in latency else None,
        f"batch {latency['batch_size']}" if "batch_size" in latency else None,
        latency.get("runtime"),
        f"{latency['repeats']} runs" if "repeats" in latency else None,
        f"{latency['warmup']} warm-up" if "warmup" in latency else None,
    ]
    details = [str(item) for item in details if item is not None]
    return text + (f"; {', '.join(details)}" if details else "")


def _energy_text(energy: Mapping[str, Any]) -> str:
    text = f"{_fmt(energy.get('total_uj'), human_energy)} total"
    text += f" (compute {_fmt(energy.get('compute_uj'), human_energy)}"
    text += f", memory {_fmt(energy.get('memory_uj'), human_energy)})"
    return text + f"; an estimate from the energy table '{energy.get('table', MISSING)}'"


def _summary(profile: Mapping[str, Any] | None) -> Section | None:
    if not profile:
        return None
    rows = []
    params, nonzero = _num(profile.get("params")), _num(profile.get("nonzero_params"))
    if params is not None:
        rows.append(("Parameters", f"{human_count(params)} ({int(params):,})"))
    if nonzero is not None:
        share = f", {percent(nonzero / params)} of all" if params else ""
        rows.append(("Non-zero parameters", f"{human_count(nonzero)} ({int(nonzero):,}{share})"))
    if _num(profile.get("stored_bytes")) is not None:
        rows.append(("Stored size", exact_bytes(profile["stored_bytes"])))
    macs = _num(profile.get("macs"))
    if macs is not None:
        rows.append(("MACs per inference", f"{human_count(macs)} ({int(macs):,})"))
    if isinstance(profile.get("latency"), Mapping):
        rows.append(("Latency", _latency_text(profile["latency"])))
    peak, note = profile.get("peak_activation_bytes"), profile.get("peak_activation_note")
    if _num(peak) is not None or note:
        text = exact_bytes(peak) if _num(peak) is not None else "not measured"
        rows.append(("Peak activation memory", text + (f" ({note})" if note else "")))
    if isinstance(profile.get("energy"), Mapping):
        rows.append(("Energy per inference (estimate)", _energy_text(profile["energy"])))
    return (
        Section("Summary", (_table(("Measure", "Value"), rows, (False, False)),)) if rows else None
    )


def _fit_row(resource: str, target: Mapping[str, Any], key: str) -> tuple[str, ...]:
    """Needed, available and margin for one memory (key "flash" or "ram") of a target."""
    needed, margin = target.get(f"needs_{key}_bytes"), target.get(f"{key}_margin_bytes")
    available = _num(target.get(f"{key}_bytes"))

    def share(value: Any) -> str:
        return _fmt(value, lambda x: percent(x / available)) if available else MISSING

    cells = (_fmt(needed, exact_bytes), _fmt(available, exact_bytes), share(needed))
    return (resource, *cells, _fmt(margin, exact_bytes), share(margin))


def _device_fit(profile: Mapping[str, Any] | None) -> Section | None:
    target = (profile or {}).get("target")
    if not isinstance(target, Mapping):
        return None
    about = f"Target: {target.get('name', MISSING)}"
    about += f" ({target['description']})" if target.get("description") else ""
    fits = {True: "yes", False: "no"}.get(target.get("fits"), MISSING)
    rows = [_fit_row("Flash", target, "flash"), _fit_row("RAM", target, "ram")]
    header = ("Memory", "Needed", "Available", "Needed (% of available)", "Margin", "Margin (%)")
    table = _table(header, rows, (False, True, True, True, True, True))
    return Section("Device fit", (about, f"Fits: {fits}", table))


def _compare_row(label: str, value: Any, ref: Any, style: str, with_ref: bool) -> tuple[str, ...]:
    cells = (label, _fmt(value, _STYLE[style]))
    if not with_ref:
        return cells
    a, b = _num(value), _num(ref)
    diff = MISSING if a is None or b is None else _DIFF[style](a - b)
    return (*cells, _fmt(ref, _STYLE[style]), diff)


def _compare_table(first: str, rows: list[tuple[str, ...]], with_ref: bool) -> Table:
    header = (first, "Compressed", "Original", "Difference") if with_ref else (first, "Value")
    return _table(header, rows, (False,) + (True,) * (len(header) - 1))


def _headline_keys(metrics: Mapping[str, Any], ref: Mapping[str, Any]) -> list[tuple[str, ...]]:
    known = _HEADLINE.get(str(metrics.get("kind")), ())
    keys = [entry for entry in known if entry[0] in metrics or entry[0] in ref]
    skip = _NOT_HEADLINE | {entry[0] for entry in known}
    extra = sorted(
        k for k, v in {**ref, **metrics}.items() if k not in skip and _num(v) is not None
    )
    return keys + [(k, k, "count" if isinstance(metrics.get(k), int) else "float") for k in extra]


def _class_order(key: Any) -> tuple[int, Any]:
    text = str(key)
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


def _metrics(metrics: Mapping[str, Any] | None, ref: Mapping[str, Any] | None) -> Section | None:
    if not metrics:
        return None
    ref = ref or {}
    rows = [
        _compare_row(label, metrics.get(k), ref.get(k), style, bool(ref))
        for k, label, style in _headline_keys(metrics, ref)
    ]
    blocks: list[Block] = [f"Kind: {metrics.get('kind', 'custom')}."]
    if ref:
        blocks.append("Difference is compressed minus original; rates in percentage points (pp).")
    blocks.append(_compare_table("Metric", rows, bool(ref)))
    per_class = metrics.get("per_class_accuracy") or {}
    if isinstance(per_class, Mapping) and per_class:
        ref_class = ref.get("per_class_accuracy") or {}
        rows = [
            _compare_row(str(c), per_class[c], ref_class.get(c), "rate", bool(ref_class))
            for c in sorted(per_class, key=_class_order)
        ]
        blocks += ["Accuracy per class:", _compare_table("Class", rows, bool(ref_class))]
    points, ref_points = noise_points(metrics), noise_points(ref)
    if points:
        rows = [
            _compare_row(
                _fmt(p.get("sigma"), lambda s: f"{s:g}"),
                p.get("top1"),
                _match_sigma(ref_points, p.get("sigma")),
                "rate",
                bool(ref_points),
            )
            for p in points
        ]
        blocks += [
            "Top-1 accuracy with Gaussian noise of standard deviation sigma added to the input:",
            _compare_table("Noise sigma", rows, bool(ref_points)),
            Chart(NOISE_CHART, "Top-1 accuracy versus input noise sigma"),
        ]
    return Section("Metrics", tuple(blocks))


def _match_sigma(points: list[Mapping[str, Any]], sigma: Any) -> Any:
    """The top-1 of the point in ``points`` at the same noise ``sigma``, or None."""
    target = _num(sigma)
    for point in points:
        value = _num(point.get("sigma"))
        if target is not None and value is not None and abs(value - target) <= 1e-9:
            return point.get("top1")
    return None


def _layers(profile: Mapping[str, Any] | None) -> Section | None:
    layers = layer_list(profile)
    if not layers:
        return None
    total = sum(_num(layer.get("stored_bytes")) or 0.0 for layer in layers)
    rows = [
        (
            layer.get("name"),
            layer.get("type"),
            _fmt(layer.get("params"), _STYLE["count"]),
            _fmt(layer.get("stored_bytes"), human_bytes),
            _fmt(layer.get("macs"), human_count),
            _fmt(layer.get("stored_bytes"), lambda b: percent(b / total)) if total else MISSING,
        )
        for layer in layers
    ]
    header = ("Layer", "Type", "Params", "Stored", "MACs", "Share of bytes")
    shown = f" (largest {TOP_LAYERS})" if len(layers) > TOP_LAYERS else ""
    return Section(
        "Layers",
        (
            f"{len(layers)} layers, {exact_bytes(total)} stored in all.",
            _table(header, rows, (False, False, True, True, True, True)),
            Chart(PER_LAYER_CHART, f"Stored bytes per layer{shown}"),
        ),
    )


def _artifact(artifact: Mapping[str, Any] | None) -> Section | None:
    if not artifact:
        return None
    yes_no = {True: "yes", False: "no"}
    rows = [
        ("Path", artifact.get("path", MISSING)),
        ("Size", _fmt(artifact.get("bytes"), exact_bytes)),
        ("SHA-256", artifact.get("sha256", MISSING)),
        ("Signed", yes_no.get(artifact.get("signed"), MISSING)),
        ("Signature verified", yes_no.get(artifact.get("verified"), MISSING)),
        ("Key id", artifact.get("key_id") or MISSING),
    ]
    return Section("Artifact", (_table(("Field", "Value"), rows, (False, False)),))


def _notes(notes: Sequence[Any] | None) -> Section | None:
    items = tuple(str(note) for note in notes or ())
    return Section("Notes", (Bullets(items),)) if items else None


def build_sections(report: Mapping[str, Any]) -> list[Section]:
    """The report's content as sections; absent or empty parts of the report are left out."""
    check_report(report)
    built = [
        _overview(report),
        _summary(report.get("profile")),
        _device_fit(report.get("profile")),
        _metrics(report.get("metrics"), report.get("reference_metrics")),
        sensitivity_section(report.get("sensitivity")),
        _layers(report.get("profile")),
        _artifact(report.get("artifact")),
        _notes(report.get("notes")),
    ]
    return [section for section in built if section is not None and section.blocks]
