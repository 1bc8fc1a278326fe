"""Shared test set-up: a project-local cache so built-in models train once per checkout."""

import os
from pathlib import Path

os.environ.setdefault(
    "COMPACTML_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "cml-cache")
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
