"""Shared set-up for the command's tests: run it in-process and read what it printed."""

import json

import pytest

from compactml.cli import main


class CLI:
    """Runs ``compactml`` through :func:`main` with pytest's ``capsys`` catching its output."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def json(self, *args: str):
        """The command's ``--json`` output, parsed; fails the test unless it exits 0."""
        code = main([*args, "--json"])
        captured = self.capsys.readouterr()
        assert code == 0, captured.err
        return json.loads(captured.out)

    def error(self, args, pattern: str) -> str:
        """The command's error: exit code 2 and one ``error: ...`` line holding ``pattern``."""
        code = main(list(args))
        err = self.capsys.readouterr().err.strip()
        assert code == 2
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert pattern in err, err
        return err


@pytest.fixture
def cli(capsys):
    return CLI(capsys)
