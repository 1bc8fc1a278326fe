"""The report as one self-contained HTML page: inline CSS, charts embedded as base64 PNG.

The page loads nothing from anywhere (its Content-Security-Policy forbids it), so it can be
mailed, archived or opened offline. It shows the same sections as the Markdown report
(``compactml.report.markdown.build_sections``); every piece of user text is HTML-escaped.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from html import escape
from typing import Any

from compactml.report.blocks import Block, Bullets, Chart, Table
from compactml.report.plots import render_charts
from compactml.report.sections import build_sections

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 72rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3rem; }
h2 { margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .92rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left;
         vertical-align: top; overflow-wrap: anywhere; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: .9rem; }
"""

# Defence in depth: even if some text escaped escaping, the page may load nothing external.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _cell(tag: str, text: str, numeric: bool) -> str:
    css = ' class="num"' if numeric else ""
    return f"<{tag}{css}>{escape(text)}</{tag}>"


def _row(tag: str, cells: tuple[str, ...], numeric: tuple[bool, ...]) -> str:
    return "<tr>" + "".join(_cell(tag, c, n) for c, n in zip(cells, numeric, strict=True)) + "</tr>"


def _table(table: Table) -> str:
    head = _row("th", table.header, table.numeric)
    rows = "".join(_row("td", row, table.numeric) for row in table.rows)
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>"


def _figure(chart: Chart, charts: Mapping[str, bytes]) -> str:
    png = charts.get(chart.file)
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    alt = escape(chart.alt)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def _block(block: Block, charts: Mapping[str, bytes]) -> str:
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Chart):
        return _figure(block, charts)
    return f"<p>{escape(block)}</p>"


def render_html(report: Mapping[str, Any], charts: Mapping[str, bytes] | None = None) -> str:
    """The report as a self-contained HTML page.

    ``charts`` maps chart file names to PNG bytes, as ``render_charts`` returns them; when
    None they are drawn here. Charts are embedded as ``data:image/png;base64`` URIs.
    """
    sections = build_sections(report)
    if charts is None:
        charts = render_charts(report)
    title = escape(report["title"])
    body = [f"<h1>{title}</h1>"]
    for section in sections:
        body.append(f"<section>\n<h2>{escape(section.title)}</h2>")
        body += [_block(block, charts) for block in section.blocks]
        body.append("</section>")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
