"""The report on a terminal: the same sections as Markdown and HTML, as rich tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import RenderableType
from rich.table import Table as RichTable
from rich.text import Text

from compactml.report.blocks import Bullets, Chart, Table
from compactml.report.sections import build_sections, human_bytes


def _rich_table(table: Table, title: str | None = None) -> RichTable:
    out = RichTable(title=title, title_justify="left", title_style="bold")
    for name, numeric in zip(table.header, table.numeric, strict=True):
        out.add_column(name, justify="right" if numeric else "left")
    for row in table.rows:
        out.add_row(*row)
    return out


def console_blocks(
    report: Mapping[str, Any], skip: Sequence[str] = ("Overview",)
) -> list[RenderableType]:
    """Renderables for ``rich.Console.print``: each section's tables and text, charts left out
    (they are in the HTML report). Sections whose title is in ``skip`` are omitted."""
    blocks: list[RenderableType] = []
    for section in build_sections(report):
        if section.title in skip:
            continue
        title: str | None = section.title
        for block in section.blocks:
            if isinstance(block, Table):
                blocks.append(_rich_table(block, title))
                title = None
                continue
            if isinstance(block, Chart):
                continue
            if title:
                blocks.append(Text(title, style="bold"))
                title = None
            lines = block.items if isinstance(block, Bullets) else (block,)
            blocks.extend(Text(f"  {line}") for line in lines)
    return blocks


def targets_table(rows: Sequence[Mapping[str, Any]]) -> RichTable:
    """The device table: name, RAM, flash or storage, description."""
    table = RichTable(title="Devices for --target", title_justify="left", title_style="bold")
    for name, justify in (("name", "left"), ("RAM", "right"), ("flash", "right"), ("", "left")):
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(
            str(row["name"]),
            human_bytes(row["ram_bytes"]),
            human_bytes(row["flash_bytes"]),
            str(row.get("description", "")),
        )
    return table
