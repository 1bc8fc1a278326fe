"""The report as Markdown, rendered from the shared sections."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from compactml.report.blocks import Block, Bullets, Chart, Table
from compactml.report.sections import build_sections

_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*[]<>|"})


def md_escape(text: Any) -> str:
    """``text`` on one line with Markdown and HTML specials escaped, so it shows as written."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text)).translate(_MD_SPECIAL)


def _md_line(text: Any) -> str:
    """``md_escape`` for text that starts a line: a leading # - + or = would start a block."""
    flat = md_escape(text)
    return "\\" + flat if flat[:1] in ("#", "-", "+", "=") else flat


def _md_table(table: Table) -> list[str]:
    align = ["---:" if numeric else "---" for numeric in table.numeric]
    lines = ["| " + " | ".join(md_escape(cell) for cell in table.header) + " |"]
    lines.append("| " + " | ".join(align) + " |")
    lines += ["| " + " | ".join(md_escape(cell) for cell in row) + " |" for row in table.rows]
    return lines


def _md_block(block: Block) -> list[str]:
    if isinstance(block, Table):
        return _md_table(block)
    if isinstance(block, Bullets):
        return [f"- {_md_line(item)}" for item in block.items]
    if isinstance(block, Chart):
        return [f"![{md_escape(block.alt)}]({block.file})"]
    return [_md_line(block)]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown; charts are referenced as PNG files beside the ``.md`` file."""
    sections = build_sections(report)
    lines = [f"# {md_escape(report['title'])}"]
    for section in sections:
        lines += ["", f"## {md_escape(section.title)}"]
        for block in section.blocks:
            lines += [""] + _md_block(block)
    return "\n".join(lines) + "\n"
