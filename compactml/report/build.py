"""Assemble the report dict that the writers in this package render."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any


def new_report(title: str, model: str, **sections: Any) -> dict:
    """A report with a title, the model's name, a timestamp, the tool version and the given
    sections (``profile``, ``metrics``, ``reference_metrics``, ``artifact``, ``sensitivity``,
    ``notes``); sections that are None are left out."""
    from compactml import __version__

    report = {
        "title": title,
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "compactml_version": __version__,
    }
    report.update({key: value for key, value in sections.items() if value is not None})
    return report
