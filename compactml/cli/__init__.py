"""The ``compactml`` command: profile, evaluate, quantize, prune, scan sensitivity, sign and
verify models from the shell.

MODEL arguments accept a built-in name (``digits-cnn``, ``minilm``, ``tiny-llama``), a
``.cml`` artifact, a Hugging Face model folder, or ``path/to/file.py:factory``. The flags
``--json`` (machine output on stdout), ``--quiet`` (errors only) and ``--debug`` (tracebacks)
may appear anywhere on the command line. Bad input prints ``error: <what and how to fix>``
and exits with 2.
"""

from __future__ import annotations

import sys

from rich.console import Console

# Importing the command modules registers their commands on ``app``.
from compactml.cli import compress, keys, measure, sensitivity  # noqa: F401
from compactml.cli.app import GLOBAL_FLAGS, OUT, Output, app
from compactml.errors import CompactMLError

__all__ = ["app", "main"]


def _split_global_flags(argv: list[str]) -> tuple[list[str], Output]:
    flags = {flag for flag in GLOBAL_FLAGS if flag in argv}
    rest = [arg for arg in argv if arg not in GLOBAL_FLAGS]
    console = Console(stderr="--json" in flags, highlight=False)
    return rest, Output("--json" in flags, "--quiet" in flags, "--debug" in flags, console)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``compactml`` console script; returns the exit code."""
    args, settings = _split_global_flags(list(sys.argv[1:] if argv is None else argv))
    OUT.configure(settings)
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
