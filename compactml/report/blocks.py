"""The building blocks of a report document: paragraphs, bullet lists, tables, chart references.

``compactml.report.sections`` and the section builders beside it (``sensitivity.py``) produce
these; the Markdown, HTML and console renderers draw them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MISSING = "—"  # shown where a value is absent


def percent(fraction: float) -> str:
    """A fraction in [0, 1] as a percent with two decimals: 0.9512 -> "95.12%"."""
    return f"{float(fraction) * 100:.2f}%"


@dataclass(frozen=True)
class Table:
    """A table of formatted cells; ``numeric`` marks the columns to align right."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of plain-text items."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Chart:
    """A chart written beside the report as ``file`` (PNG), described by ``alt``."""

    file: str
    alt: str


Block = str | Table | Bullets | Chart  # a str is a plain-text paragraph


@dataclass(frozen=True)
class Section:
    """One titled part of the report: its blocks in reading order."""

    title: str
    blocks: tuple[Block, ...]


def make_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool]
) -> Table:
    """A :class:`Table` whose cells are ``str(cell)``, None shown as :data:`MISSING`."""
    cells = tuple(tuple(MISSING if cell is None else str(cell) for cell in row) for row in rows)
    return Table(tuple(header), cells, tuple(numeric))
