"""``compactml profile``, ``eval`` and ``targets``: what a model costs and how good it is."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from compactml.cli.app import OUT, TRUST_HELP, _example_input, _resolve, _save_report, app
from compactml.errors import CompactMLError
from compactml.report.build import new_report


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


@app.command()
def targets() -> None:
    """List the built-in devices that --target accepts, with their memory."""
    from compactml.profile.targets import load_targets
    from compactml.report.console import targets_table

    rows = [asdict(t) for t in load_targets().values()]
    OUT.emit(rows)
    OUT.print(targets_table(rows))
