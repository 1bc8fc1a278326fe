"""Progress bars for long loops (training, calibration, evaluation), on standard error.

Standard output stays clean for results (``compactml ... --json``); every bar can be turned off.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")


def progress_bar(
    items: Iterable[T], description: str, total: float | None = None, enabled: bool = True
) -> Iterator[T]:
    """Iterate over ``items`` with a rich progress bar on stderr (none when not ``enabled``)."""
    console = Console(stderr=True)
    yield from track(items, description, total=total, disable=not enabled, console=console)
