"""Reports: JSON, Markdown and self-contained HTML, with charts (``write_report``)."""

from compactml.report.html import render_html
from compactml.report.markdown import render_markdown
from compactml.report.plots import render_charts
from compactml.report.sections import human_bytes, human_count, percent
from compactml.report.writer import report_json, to_jsonable, write_report

__all__ = [
    "human_bytes",
    "human_count",
    "percent",
    "render_charts",
    "render_html",
    "render_markdown",
    "report_json",
    "to_jsonable",
    "write_report",
]
