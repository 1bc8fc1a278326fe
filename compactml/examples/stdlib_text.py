"""Real text for language models: the source code of Python's own standard library.

Every Python installation carries about ten megabytes of carefully written Python, so a small
causal language model can be trained and evaluated offline, without downloading a data set.
The files are read as text; nothing is imported or executed.

Whole modules are held out for evaluation: a module goes to the eval split when the SHA-256 of
its path (relative to the stdlib folder) falls into a fixed 5% bucket. The split therefore
depends only on file names, and no text of an eval module is ever trained on. The corpus is
deterministic for a given Python version (it reads that version's stdlib).

Tokenized text becomes one stream (modules joined by a separator token) cut into fixed-length
windows, the sequences a causal language model trains and is scored on.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Folders left out: test suites, vendored or generated code, GUI demos and installed packages.
EXCLUDED_DIRS = frozenset(
    {
        "__pycache__",
        "dist-packages",
        "ensurepip",
        "idle_test",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "test",
        "tests",
        "tkinter",
        "turtledemo",
    }
)
EVAL_PERCENT = 5  # share of modules (by path hash) held out for evaluation
BUCKETS = 100


@dataclass(frozen=True)
class ModuleSplit:
    """Stdlib modules by split: paths relative to ``root`` (POSIX form), each tuple sorted."""

    root: Path
    train: tuple[str, ...]
    eval: tuple[str, ...]


def stdlib_root() -> Path:
    """The folder of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_files(root: Path) -> tuple[str, ...]:
    """Every ``.py`` file under ``root`` outside :data:`EXCLUDED_DIRS`, as sorted relative paths."""
    names = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if path.is_file() and not EXCLUDED_DIRS.intersection(relative.parts[:-1]):
            names.append(relative.as_posix())
    return tuple(sorted(names))


def bucket(name: str) -> int:
    """The fixed bucket (0..99) of module path ``name``: SHA-256 of the path, modulo 100."""
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:16], 16) % BUCKETS


def is_held_out(name: str) -> bool:
    """Whether module path ``name`` belongs to the eval split (its bucket is below 5)."""
    return bucket(name) < EVAL_PERCENT


def split_modules(
    root: Path, names: tuple[str, ...], max_train: int | None = None, max_eval: int | None = None
) -> ModuleSplit:
    """Split module paths by :func:`is_held_out`; ``max_train``/``max_eval`` keep the first few
    of each (in sorted order), for small corpora in tests.
    """
    train = tuple(name for name in names if not is_held_out(name))
    evals = tuple(name for name in names if is_held_out(name))
    return ModuleSplit(root, train[:max_train], evals[:max_eval])


@functools.cache
def stdlib_split(max_train: int | None = None, max_eval: int | None = None) -> ModuleSplit:
    """The standard module split of the running interpreter's stdlib (cached per process)."""
    root = stdlib_root()
    return split_modules(root, module_files(root), max_train, max_eval)


def read_texts(root: Path, names: tuple[str, ...]) -> list[str]:
    """The text of each module, in order. Bytes that are not UTF-8 become U+FFFD."""
    return [(root / name).read_bytes().decode("utf-8", errors="replace") for name in names]


def token_stream(tokenizer: Any, texts: list[str], separator: str) -> torch.Tensor:
    """All ``texts`` encoded by a ``tokenizers.Tokenizer`` as one 1-D int64 tensor of token
    ids, each text followed by the id of the special token ``separator``."""
    eos = tokenizer.token_to_id(separator)
    ids = [token for enc in tokenizer.encode_batch(texts) for token in (*enc.ids, eos)]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, context: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping ``(n, context)`` windows (the rest is dropped)."""
    count = len(stream) // context
    return stream[: count * context].reshape(count, context)


def evenly_spaced(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows spread evenly over ``rows``, first row included (all rows if fewer)."""
    if len(rows) <= count:
        return rows
    return rows[torch.linspace(0, len(rows) - 1, count).round().long()]
