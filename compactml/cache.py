"""Where compactml keeps what it computes once per machine (trained built-in models).

``COMPACTML_CACHE`` overrides the location; otherwise the platform's user cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The cache directory, created if missing."""
    root = os.environ.get("COMPACTML_CACHE") or platformdirs.user_cache_dir("compactml")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
