"""``compactml sensitivity``: how much each layer's compression costs, level by level."""

from __future__ import annotations

from pathlib import Path

import typer

from compactml.cli.app import OUT, TRUST_HELP, _resolve, _save_report, app
from compactml.errors import CompactMLError
from compactml.report.build import new_report


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
