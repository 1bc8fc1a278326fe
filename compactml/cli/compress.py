"""``compactml quantize`` and ``prune``: compress a model, write the artifact, the ONNX file
and a report against the original."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from compactml.cli.app import OUT, TRUST_HELP, _example_input, _resolve, _save_report, app
from compactml.errors import CompactMLError
from compactml.report.build import new_report

if TYPE_CHECKING:
    from compactml.config import Technique


@dataclass(frozen=True)
class _Reporting:
    """What a compress command says of its result, the rest of its report being shared: the
    verb of its title, the profiling repeats, ``notes(before, after, new, name)`` from the two
    profiles, and ``onnx_notes(net, new, example, onnx_path)`` on the ONNX file."""

    verb: str
    repeats: int
    notes: Callable[[dict, dict, Any, str], list[str]]
    onnx_notes: Callable[[Any, Any, Any, Path], list[str]]


def _write_and_report(
    how: _Reporting, name: str, model: str, net, new, task, example, out: Path, onnx: bool
) -> None:
    """What ``quantize`` and ``prune`` do once they hold the ``new`` model (made from ``net``
    with scheme or method ``name``): write model.cml (and model.onnx), profile and evaluate it
    against ``net``, and write the report, printed or as JSON."""
    from compactml.evaluate import evaluate
    from compactml.export.artifact import save
    from compactml.export.onnx import export
    from compactml.profile import profile as run_profile
    from compactml.report.console import console_blocks

    artifact = save(new, out / "model.cml")
    onnx_path = export(new, out / "model.onnx", example) if onnx else None
    before = run_profile(net, example, repeats=how.repeats).to_dict()
    after = run_profile(new, example, repeats=how.repeats).to_dict()
    has_eval = task is not None and task.has("eval")
    metrics = dict(evaluate(new, task, reference=net)) if has_eval else None
    original = dict(evaluate(net, task)) if has_eval else None
    notes = how.notes(before, after, new, name)
    notes.append(f"Artifact: {artifact}" + (f"; ONNX: {onnx_path}" if onnx_path else ""))
    if onnx_path is not None:
        notes += how.onnx_notes(net, new, example, onnx_path)
    full = new_report(
        f"{model} {how.verb} with {name}",
        model,
        profile=after,
        metrics=metrics,
        reference_metrics=original,
        notes=notes,
    )
    OUT.emit(full)
    OUT.print(*console_blocks(full, skip=("Overview", "Layers")))
    _save_report(full, out)


def _compare_notes(original: dict, quantized: dict, net, scheme: str) -> list[str]:
    from compactml.config import history

    ratio = quantized["stored_bytes"] / original["stored_bytes"]
    notes = [
        f"Scheme {scheme}: artifact {quantized['stored_bytes']:,} bytes, {ratio:.3f}x the "
        f"original's {original['stored_bytes']:,} bytes.",
    ]
    for entry in history(net):
        for layer, reason in entry["skipped"].items():
            notes.append(f"{entry['technique']} left {layer} in float: {reason}")
        if "selection" in entry and "per_tensor" in entry:
            notes.append(_per_tensor_note(entry))
    return notes


def _per_tensor_note(entry: dict) -> str:
    """What ``Dynamic(per_tensor="auto")`` chose, from its history entry."""
    chosen, found = entry["per_tensor"], entry["selection"]
    base, error = found["output_error_per_token"], found["output_error"]
    growth = f"{error / base - 1:+.1%}" if base > 0 else "unchanged"
    names = ", ".join(chosen) if chosen else "none"
    return (
        f"{entry['technique']}: {len(chosen)} of {len(entry['changed'])} layers quantize "
        f"activations per tensor, chosen on calibration data ({found['measure']}: "
        f"{error:.3g}, {growth} over all per token; tolerance "
        f"{found['tolerance'] * 100:.4g}%): {names}."
    )


def _onnx_notes(net, quantized, example, onnx_path: Path) -> list[str]:
    """Check the ONNX file against PyTorch, and time it against the fp32 model in ORT."""
    import tempfile

    import numpy as np
    import torch

    from compactml.export import ort
    from compactml.export.onnx import export
    from compactml.task import call_model, primary_output

    sess = ort.session(onnx_path)
    with torch.inference_mode():
        expected = primary_output(call_model(quantized.eval(), example)).numpy()
    diff = float(np.abs(ort.run(sess, example)[0] - expected).max())
    with tempfile.TemporaryDirectory() as folder:
        fp32 = ort.session(export(net, Path(folder) / "fp32.onnx", example))
        base = ort.latency(fp32, example, repeats=20)["median_ms"]
    quant = ort.latency(sess, example, repeats=20)["median_ms"]
    return [
        f"ONNX Runtime output vs PyTorch: max abs difference {diff:.2e}.",
        f"ONNX Runtime latency ({ort.DEFAULT_THREADS} threads, median of 20): fp32 "
        f"{base:.3f} ms, quantized {quant:.3f} ms ({base / quant:.2f}x).",
    ]


QUANTIZE = _Reporting("quantized", repeats=5, notes=_compare_notes, onnx_notes=_onnx_notes)


def _quiet(config: Technique) -> Technique:
    """``config`` with its progress bar shown only in human output (not with --json)."""
    if "progress" in {f.name for f in dataclasses.fields(config)}:
        return dataclasses.replace(config, progress=OUT.human)
    return config


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Argument(..., help="built-in name, .cml file, HF folder or file.py:fn"),
    scheme: str = typer.Option(..., help="int8-weight, int4-weight, int2-weight, fp16, ..."),
    out: Path = typer.Option(..., "--out", "-o", help="output folder for model.cml, model.onnx"),
    group_size: int | None = typer.Option(None, help="weights per scale (16 to 256)"),
    exclude: list[str] = typer.Option([], help="module-name pattern to keep in float"),
    onnx: bool = typer.Option(True, help="also export model.onnx for ONNX Runtime"),
    input_shape: str | None = typer.Option(None, help="example input shape, e.g. 1,3,224,224"),
    trust_factory: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    """Quantize a model; write the .cml artifact, the ONNX file and a report vs the original."""
    from compactml.quantize import quantize
    from compactml.quantize.schemes import scheme_config

    config = _quiet(scheme_config(scheme, group_size=group_size, exclude=exclude))
    if out.exists() and not out.is_dir():
        raise CompactMLError(f"--out {out} is a file; give a folder for the outputs")
    net, task = _resolve(model, trust_factory)
    example = _example_input(task, input_shape)
    quantized = quantize(net, config, task)
    _write_and_report(QUANTIZE, scheme, model, net, quantized, task, example, out, onnx)


def _prune_notes(before: dict, after: dict, net, method: str) -> list[str]:
    from compactml.config import history

    notes = [
        f"Method {method}: artifact {after['stored_bytes']:,} bytes "
        f"({after['stored_bytes'] / before['stored_bytes']:.3f}x), parameters "
        f"{after['params']:,} ({after['params'] / max(before['params'], 1):.3f}x), non-zero "
        f"{after['nonzero_params']:,}, MACs {after['macs']:,} "
        f"({after['macs'] / max(before['macs'], 1):.3f}x).",
    ]
    b, a = (before.get("latency") or {}), (after.get("latency") or {})
    if b.get("median_ms") and a.get("median_ms"):
        b, a = b["median_ms"], a["median_ms"]
        notes.append(f"PyTorch latency: {b:.3f} ms before, {a:.3f} ms after ({b / a:.2f}x).")
    for entry in history(net):
        for layer, reason in entry["skipped"].items():
            notes.append(f"{entry['technique']} left {layer} alone: {reason}")
    return notes


def _ort_speed_notes(net, pruned, example, onnx_path: Path) -> list[str]:
    import tempfile

    from compactml.export import ort
    from compactml.export.onnx import export

    with tempfile.TemporaryDirectory() as folder:
        base = ort.latency(ort.session(export(net, Path(folder) / "a.onnx", example)), example)
    after = ort.latency(ort.session(onnx_path), example)
    b, a = base["median_ms"], after["median_ms"]
    return [
        f"ONNX Runtime latency ({ort.DEFAULT_THREADS} threads): {b:.3f} ms before, {a:.3f} ms "
        f"after ({b / a:.2f}x)."
    ]


PRUNE = _Reporting("pruned", repeats=10, notes=_prune_notes, onnx_notes=_ort_speed_notes)


def _check_pruned(pruned, method: str, model: str) -> None:
    """Raise when the method changed no layer, rather than write the model back unchanged."""
    from compactml.config import history

    records = history(pruned)
    if records and records[-1]["changed"]:
        return
    skipped = records[-1]["skipped"] if records else {}
    why = "".join(f" ({name}: {reason})" for name, reason in list(skipped.items())[:1])
    raise CompactMLError(
        f"--method {method} pruned nothing in {model}{why}; choose a method that fits the "
        "model (heads needs attention layers) or loosen --exclude"
    )


@app.command("prune")
def prune_cmd(
    model: str = typer.Argument(..., help="built-in name, .cml file, HF folder or file.py:fn"),
    method: str = typer.Option(
        ..., help="magnitude, taylor, nm, sparsegpt, wanda, channels or heads"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder for model.cml, model.onnx"),
    sparsity: float | None = typer.Option(None, help="share of weights to zero (unstructured)"),
    ratio: float | None = typer.Option(None, help="share of channels or heads to remove"),
    scope: str | None = typer.Option(None, help="layer or global (magnitude, taylor)"),
    n: int | None = typer.Option(None, help="N of N:M (weights kept per group)"),
    m: int | None = typer.Option(None, help="M of N:M (group size)"),
    importance: str | None = typer.Option(None, help="l1, l2, taylor or bn_scale (channels)"),
    steps: int | None = typer.Option(None, help="iterative schedule: pruning steps"),
    epochs: int | None = typer.Option(None, help="fine-tuning epochs per step / after pruning"),
    lr: float | None = typer.Option(None, help="fine-tuning learning rate"),
    exclude: list[str] = typer.Option([], help="module-name pattern to leave alone"),
    onnx: bool = typer.Option(True, help="also export model.onnx and time it in ONNX Runtime"),
    input_shape: str | None = typer.Option(None, help="example input shape, e.g. 1,3,224,224"),
    trust_factory: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    """Prune a model; write the .cml artifact, the ONNX file and a report vs the original.

    With --epochs and no --steps, the pruned model is fine-tuned on the task's training data
    afterwards (masks kept)."""
    from compactml.prune import prune
    from compactml.prune.methods import method_config

    options = dict(sparsity=sparsity, ratio=ratio, scope=scope, n=n, m=m, steps=steps)
    options |= dict(importance=importance, epochs=epochs, lr=lr, exclude=exclude)
    config = _quiet(method_config(method, **options))
    if out.exists() and not out.is_dir():
        raise CompactMLError(f"--out {out} is a file; give a folder for the outputs")
    net, task = _resolve(model, trust_factory)
    example = _example_input(task, input_shape)
    pruned = prune(net, config, task)
    _check_pruned(pruned, method, model)
    if epochs and not steps:
        from compactml.training import fine_tune

        fine_tune(pruned, task, epochs=epochs, lr=lr or 1e-3, progress=OUT.human)
        pruned.eval()
    _write_and_report(PRUNE, method, model, net, pruned, task, example, out, onnx)
