"""The ``compactml`` Typer app and what every command shares: how to speak (``OUT``), how to
resolve a MODEL argument, an example input, and where reports go."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from compactml.errors import CompactMLError

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

    def configure(self, other: Output) -> None:
        """Take ``other``'s settings (the command modules hold this very object)."""
        self.json, self.quiet, self.debug = other.json, other.quiet, other.debug
        self.console = other.console


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
