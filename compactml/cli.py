"""The ``compactml`` command: profile, evaluate, quantize, prune, scan sensitivity, sign and
verify models from the shell.

MODEL arguments accept a built-in name (``digits-cnn``, ``minilm``), a ``.cml`` artifact, a
Hugging Face model folder, or ``path/to/file.py:factory``. The flags ``--json`` (machine
output on stdout), ``--quiet`` (errors only) and ``--debug`` (tracebacks) may appear anywhere
on the command line. Bad input prints ``error: <what and how to fix>`` and exits with 2.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from compactml.errors import CompactMLError
from compactml.report.build import new_report

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make trained PyTorch models smaller, faster and cheaper to run, and prove it. "
    "Global flags, anywhere on the line: --json, --quiet, --debug.",
)
GLOBAL_FLAGS = ("--json", "--quiet", "--debug")


@dataclass
class Output:
    """How the current command should speak: rich tables, JSON on stdout, or nothing."""

    json: bool = False
    quiet: bool = False
    debug: bool = False
    console: Console = field(default_factory=lambda: Console(highlight=False))

    @property
    def human(self) -> bool:
        return not (self.json or self.quiet)

    def print(self, *items: Any) -> None:
        if self.human:
            for item in items:
                self.console.print(item)

    def emit(self, data: Any) -> None:
        """Print ``data`` as JSON on stdout when --json is set."""
        if self.json:
            sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


OUT = Output()


def _example_input(task, input_shape: str | None):
    import torch

    if input_shape:
        try:
            shape = tuple(int(part) for part in input_shape.replace("x", ",").split(","))
        except ValueError:
            shape = ()
        if not shape or min(shape) < 1:
            raise CompactMLError(
                f"--input-shape {input_shape!r} is not a list of positive integers; "
                "write e.g. 1,3,224,224"
            )
        return torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if task is None:
        raise CompactMLError(
            "this model has no built-in task to take an example input from; "
            "pass --input-shape, e.g. --input-shape 1,3,224,224"
        )
    return task.example_input()


def _resolve(model: str, trust_factory: bool = False):
    from compactml.source import resolve

    return resolve(model, progress=OUT.human, trust_factory=trust_factory)


TRUST_HELP = "let a .cml made from a file.py:factory run that file to rebuild its architecture"


def _save_report(report: dict, folder: Path | None) -> None:
    if folder is None:
        return
    from compactml.report import write_report

    paths = write_report(report, folder)
    OUT.print(f"report written to {paths['html']}")


@app.command()
def profile(
    model: str = typer.Argument(..., help="built-in name, .cml file, HF folder or file.py:fn"),
    target: str | None = typer.Option(None, help="device to check the fit against (see targets)"),
    repeats: int = typer.Option(30, min=1, help="timed runs for the latency median"),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for the latency runs"),
    input_shape: str | None = typer.Option(None, help="example input shape, e.g. 1,3,224,224"),
    report: Path | None = typer.Option(None, "--report", "-o", help="write a report folder"),
    trust_factory: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    """Measure size as stored, MACs, latency, peak memory, energy, and the fit on a device."""
    from compactml.profile import profile as run_profile
    from compactml.profile.targets import get_target
    from compactml.report.console import console_blocks

    if target is not None:
        get_target(target)  # an unknown device fails before the model is loaded
    net, task = _resolve(model, trust_factory)
    example = _example_input(task, input_shape)
    result = run_profile(net, example, target=target, repeats=repeats, threads=threads)
    data = result.to_dict()
    OUT.emit(data)
    full = new_report(f"Profile of {model}", model, profile=data)
    OUT.print(*console_blocks(full))
    _save_report(full, report)


@app.command("eval")
def evaluate_cmd(
    model: str = typer.Argument(..., help="built-in name, .cml file, HF folder or file.py:fn"),
    reference: str | None = typer.Option(None, help="original model to compare against"),
    limit: int | None = typer.Option(None, min=1, help="evaluate on the first N batches only"),
    report: Path | None = typer.Option(None, "--report", "-o", help="write a report folder"),
    trust_factory: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    """Evaluate quality: accuracy and calibration, retrieval and fidelity, or perplexity."""
    from compactml.evaluate import evaluate
    from compactml.report.console import console_blocks

    net, task = _resolve(model, trust_factory)
    if task is None:
        raise CompactMLError(
            f"{model} has no built-in task to evaluate on; evaluate it from Python with "
            "cml.evaluate(model, cml.Task(eval=...))"
        )
    ref = _resolve(reference, trust_factory)[0] if reference else None
    metrics = evaluate(net, task, reference=ref, limit=limit, progress=OUT.human)
    reference_metrics = None
    if ref is not None:
        reference_metrics = evaluate(ref, task, limit=limit, progress=OUT.human)
    reference_metrics = reference_metrics and dict(reference_metrics)
    OUT.emit({"metrics": dict(metrics), "reference_metrics": reference_metrics})
    full = new_report(
        f"Evaluation of {model}",
        model,
        metrics=dict(metrics),
        reference_metrics=reference_metrics,
    )
    OUT.print(*console_blocks(full))
    _save_report(full, report)


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
    return notes


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
    from compactml.evaluate import evaluate
    from compactml.export.artifact import save
    from compactml.export.onnx import export
    from compactml.profile import profile as run_profile
    from compactml.quantize import quantize
    from compactml.quantize.schemes import scheme_config
    from compactml.report.console import console_blocks

    config = scheme_config(scheme, group_size=group_size, exclude=exclude)
    if out.exists() and not out.is_dir():
        raise CompactMLError(f"--out {out} is a file; give a folder for the outputs")
    net, task = _resolve(model, trust_factory)
    example = _example_input(task, input_shape)
    quantized = quantize(net, config, task)
    artifact = save(quantized, out / "model.cml")
    onnx_path = export(quantized, out / "model.onnx", example) if onnx else None
    before = run_profile(net, example, repeats=5).to_dict()
    after = run_profile(quantized, example, repeats=5).to_dict()
    has_eval = task is not None and task.has("eval")
    metrics = dict(evaluate(quantized, task, reference=net)) if has_eval else None
    original = dict(evaluate(net, task)) if has_eval else None
    notes = _compare_notes(before, after, quantized, scheme)
    notes.append(f"Artifact: {artifact}" + (f"; ONNX: {onnx_path}" if onnx_path else ""))
    if onnx_path is not None:
        notes += _onnx_notes(net, quantized, example, onnx_path)
    full = new_report(
        f"{model} quantized with {scheme}",
        model,
        profile=after,
        metrics=metrics,
        reference_metrics=original,
        notes=notes,
    )
    OUT.emit(full)
    OUT.print(*console_blocks(full, skip=("Overview", "Layers")))
    _save_report(full, out)


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


def _ort_speed_note(net, pruned, example, onnx_path: Path) -> str:
    import tempfile

    from compactml.export import ort
    from compactml.export.onnx import export

    with tempfile.TemporaryDirectory() as folder:
        base = ort.latency(ort.session(export(net, Path(folder) / "a.onnx", example)), example)
    after = ort.latency(ort.session(onnx_path), example)
    b, a = base["median_ms"], after["median_ms"]
    return (
        f"ONNX Runtime latency ({ort.DEFAULT_THREADS} threads): {b:.3f} ms before, {a:.3f} ms "
        f"after ({b / a:.2f}x)."
    )


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
    method: str = typer.Option(..., help="magnitude, taylor, nm, channels or heads"),
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
    from compactml.evaluate import evaluate
    from compactml.export.artifact import save
    from compactml.export.onnx import export
    from compactml.profile import profile as run_profile
    from compactml.prune import prune
    from compactml.prune.methods import method_config
    from compactml.report.console import console_blocks

    options = dict(sparsity=sparsity, ratio=ratio, scope=scope, n=n, m=m, steps=steps)
    options |= dict(importance=importance, epochs=epochs, lr=lr, exclude=exclude)
    config = method_config(method, **options)
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
    artifact = save(pruned, out / "model.cml")
    onnx_path = export(pruned, out / "model.onnx", example) if onnx else None
    before = run_profile(net, example, repeats=10).to_dict()
    after = run_profile(pruned, example, repeats=10).to_dict()
    has_eval = task is not None and task.has("eval")
    metrics = dict(evaluate(pruned, task, reference=net)) if has_eval else None
    original = dict(evaluate(net, task)) if has_eval else None
    notes = _prune_notes(before, after, pruned, method)
    notes.append(f"Artifact: {artifact}" + (f"; ONNX: {onnx_path}" if onnx_path else ""))
    if onnx_path is not None:
        notes.append(_ort_speed_note(net, pruned, example, onnx_path))
    full = new_report(
        f"{model} pruned with {method}",
        model,
        profile=after,
        metrics=metrics,
        reference_metrics=original,
        notes=notes,
    )
    OUT.emit(full)
    OUT.print(*console_blocks(full, skip=("Overview", "Layers")))
    _save_report(full, out)


def _ranking_notes(table) -> list[str]:
    """Per level, the layers from most to least sensitive (ties in model order) with their
    damage, in percentage points for rate metrics such as top-1."""
    from compactml.report.sensitivity import RATE_METRICS

    def amount(name: str, level: float) -> str:
        damage = table.damage(name, level)
        return f"{damage * 100:.2f} pp" if table.metric in RATE_METRICS else f"{damage:.4g}"

    notes = []
    for level in table.levels:
        ranked = sorted(table.ranking(level), key=lambda name: -table.damage(name, level))
        if ranked:
            listed = ", ".join(f"{name} {amount(name, level)}" for name in ranked)
            notes.append(
                f"At {table.level_name} {level:g}, most to least sensitive "
                f"({table.describe}): {listed}"
            )
    return notes


def _check_measured(table, method: str) -> None:
    """Raise when no layer could be compressed at any level: the report would be empty."""
    if any(table.values.values()):
        return
    layer, reasons = next(iter(table.failures.items()))
    level, reason = next(iter(reasons.items()))
    raise CompactMLError(
        f"{method} could not compress any layer on its own ({layer} at {table.level_name} "
        f"{level:g}: {reason}); try another method or check --layers and --exclude"
    )


@app.command("sensitivity")
def sensitivity_cmd(
    model: str = typer.Argument(..., help="built-in name, .cml file, HF folder or file.py:fn"),
    method: str = typer.Option(..., help="magnitude, taylor, nm, channels, heads or int-weight"),
    levels: str | None = typer.Option(None, help="levels to try: 0.3,0.5,0.7 or 8,4,2 (bits)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder for the report"),
    layers: str | None = typer.Option(None, help="module names a,b (default: all it changes)"),
    batches: int = typer.Option(8, min=1, help="eval (or calib) batches per measurement"),
    measure: str = typer.Option("auto", help="auto, metric (eval data) or output (calib)"),
    scope: str | None = typer.Option(None, help="layer or global (magnitude, taylor)"),
    m: int | None = typer.Option(None, help="M of N:M for --method nm (levels are N)"),
    importance: str | None = typer.Option(None, help="l1, l2, taylor or bn_scale (channels)"),
    group_size: int | None = typer.Option(None, help="weights per scale (int-weight)"),
    exclude: list[str] = typer.Option([], help="module-name pattern to leave alone"),
    trust_factory: bool = typer.Option(False, help=TRUST_HELP),
) -> None:
    """Compress one layer at a time at each level and measure the task's metric; write the
    table and the curves into a report."""
    import dataclasses
    import warnings

    from compactml.report.console import console_blocks
    from compactml.sensitivity import sensitivity
    from compactml.sensitivity.methods import method_levels, parse_levels

    values = parse_levels(levels)
    options = dict(scope=scope, importance=importance, m=m, group_size=group_size)
    make, level_name = method_levels(method, values, exclude=exclude, **options)
    names = [name.strip() for name in (layers or "").split(",") if name.strip()] or None
    if out.exists() and not out.is_dir():
        raise CompactMLError(f"--out {out} is a file; give a folder for the report")
    net, task = _resolve(model, trust_factory)
    if task is None:
        raise CompactMLError(
            f"{model} has no built-in task to measure on; use a built-in model (or a .cml made "
            "from one), or call cml.sensitivity(model, cml.Task(eval=...), ...) from Python"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = sensitivity(
            net,
            task,
            make,
            values,
            layers=names,
            measure=measure,
            batches=batches,
            progress=OUT.human,
        )
    table = dataclasses.replace(table, level_name=level_name)
    _check_measured(table, method)
    notes = _ranking_notes(table)
    notes += [f"warning: {w.message}" for w in caught]
    full = new_report(
        f"{model}: {table.technique} sensitivity per layer",
        model,
        sensitivity=table.to_dict(),
        notes=notes,
    )
    OUT.emit(full)
    OUT.print(*console_blocks(full))
    _save_report(full, out)


@app.command()
def targets() -> None:
    """List the built-in devices that --target accepts, with their memory."""
    from compactml.profile.targets import load_targets
    from compactml.report.console import targets_table

    rows = [asdict(t) for t in load_targets().values()]
    OUT.emit(rows)
    OUT.print(targets_table(rows))


@app.command()
def keygen(
    out: Path = typer.Option(..., "--out", "-o", help="private key path; the public key gets .pub"),
) -> None:
    """Create an ed25519 key pair for signing artifacts."""
    from compactml.export.signing import key_id, load_public_key, write_keypair

    private_path, public_path = write_keypair(out)
    kid = key_id(load_public_key(public_path))
    OUT.emit({"private_key": str(private_path), "public_key": str(public_path), "key_id": kid})
    OUT.print(
        f"private key: {private_path} (keep it secret)",
        f"public key:  {public_path}",
        f"key id:      {kid}",
    )


@app.command()
def sign(
    artifact: Path = typer.Argument(..., help=".cml file to sign"),
    key: Path = typer.Option(..., "--key", "-k", help="private key (from compactml keygen)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="signed copy (default X.signed.cml)"),
) -> None:
    """Write a signed copy of an artifact; the input file is never changed."""
    from compactml.export.artifact import sign_artifact

    out = out or artifact.with_name(artifact.stem + ".signed.cml")
    path = sign_artifact(artifact, out, key)
    OUT.emit({"signed": str(path)})
    OUT.print(f"signed copy written to {path}")


@app.command()
def verify(
    artifact: Path = typer.Argument(..., help=".cml file to verify"),
    key: Path = typer.Option(..., "--key", "-k", help="public key of the signer"),
) -> None:
    """Check an artifact's digests and its signature against a public key (exit 2 if wrong)."""
    from compactml.export.artifact import verify_artifact
    from compactml.export.signing import key_id, load_public_key

    manifest = verify_artifact(artifact, key)
    summary = {
        "artifact": str(artifact),
        "verified": True,
        "key_id": key_id(load_public_key(key)),
        "tensor_sha256": manifest.get("tensor_sha256"),
        "source": manifest.get("source"),
    }
    OUT.emit(summary)
    OUT.print(
        f"[green]verified[/green] {artifact}: signature by key {summary['key_id']}, "
        f"tensor sha256 {summary['tensor_sha256']}"
    )


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="output folder"),
    target: str = typer.Option("stm32f746", help="device to check the fit against"),
) -> None:
    """Load digits-cnn, profile and evaluate it, save a signed artifact, verify it, report."""
    from compactml.demo import run_demo

    report = run_demo(out, target=target, out=OUT)
    OUT.emit(report)


def _split_global_flags(argv: list[str]) -> tuple[list[str], Output]:
    flags = {flag for flag in GLOBAL_FLAGS if flag in argv}
    rest = [arg for arg in argv if arg not in GLOBAL_FLAGS]
    console = Console(stderr="--json" in flags, highlight=False)
    return rest, Output("--json" in flags, "--quiet" in flags, "--debug" in flags, console)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``compactml`` console script; returns the exit code."""
    global OUT
    args, OUT = _split_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        # Standalone mode: typer prints usage errors itself and exits with 2 via SystemExit.
        app(args=args, prog_name="compactml", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except CompactMLError as exc:
        if OUT.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if OUT.debug:
            raise
        print(
            f"error: {exc.strerror or exc} ({exc.filename or 'file'}); check the path "
            "and its permissions",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
