"""Real text for embedding models: docstrings of Python's own standard library.

Every Python installation carries a few thousand well-written docstrings, so an embedding task
can be built offline without downloading a data set. Each docstring becomes a retrieval pair:
the *query* is its summary (the first paragraph, per PEP 257 usually one line) and the
*document* is the rest of the docstring. A good sentence encoder places each query closest to
its own document.

The modules are read as text and parsed with :mod:`ast`; they are never imported or executed.
The corpus is deterministic for a given Python version (it reads that version's stdlib).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

#: The standard library modules read, sorted. Missing ones (other Python versions) are skipped.
MODULES = (
    "argparse",
    "ast",
    "asyncio.base_events",
    "asyncio.events",
    "asyncio.locks",
    "asyncio.tasks",
    "collections",
    "configparser",
    "contextlib",
    "datetime",
    "difflib",
    "doctest",
    "email.message",
    "enum",
    "ftplib",
    "functools",
    "http.client",
    "http.cookiejar",
    "http.server",
    "imaplib",
    "importlib.metadata",
    "inspect",
    "ipaddress",
    "logging",
    "logging.handlers",
    "optparse",
    "pathlib",
    "pdb",
    "platform",
    "queue",
    "random",
    "shutil",
    "smtplib",
    "socket",
    "ssl",
    "statistics",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "traceback",
    "turtle",
    "typing",
    "unittest.case",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "xml.etree.ElementTree",
    "zipfile",
)

MIN_QUERY_CHARS = 20
MAX_QUERY_CHARS = 200
MIN_DOCUMENT_CHARS = 60
MAX_DOCUMENT_CHARS = 600
EVAL_PAIRS = 512
CALIB_PAIRS = 128  # two sentences each (query and document): 256 calibration sentences

_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Definitions only live in statement bodies: expressions are not searched.
_STATEMENT_NODES = (ast.stmt, ast.excepthandler, ast.match_case)


@dataclass(frozen=True)
class DocPair:
    """One docstring as a retrieval pair: ``key`` is ``module:qualified.name``."""

    key: str
    query: str
    document: str


@dataclass(frozen=True)
class Splits:
    """The corpus split for a Task: calibration sentences and (query, document) pairs."""

    calib: tuple[str, ...]
    train: tuple[tuple[str, str], ...]
    eval: tuple[tuple[str, str], ...]


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, at a word boundary when there is one."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return cut[:space] if space > limit // 2 else cut


def split_docstring(doc: str) -> tuple[str, str] | None:
    """Split a docstring into (summary, body); None when either is too short or too long, or
    when the body repeats the summary.

    The summary is the first paragraph (text up to the first blank line), or the first line when
    there is no blank line; the body is the rest.
    """
    paragraphs = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)
    if len(paragraphs) < 2:
        # No blank line: the summary is the first line.
        paragraphs = doc.strip().split("\n", 1)
    if len(paragraphs) < 2:
        return None
    query = normalize_whitespace(paragraphs[0])
    document = normalize_whitespace(paragraphs[1])
    if not MIN_QUERY_CHARS <= len(query) <= MAX_QUERY_CHARS:
        return None
    if len(document) < MIN_DOCUMENT_CHARS:
        return None
    if query.lower().rstrip(" .") in document.lower():
        return None  # the body repeats its summary (turtle does): retrieval would be trivial
    return query, truncate(document, MAX_DOCUMENT_CHARS)


def module_path(name: str) -> Path | None:
    """The source file of stdlib module ``name``, found without importing anything; or None.

    ``importlib.util.find_spec("a.b")`` would import package ``a``; only the top-level name is
    looked up that way and the rest is followed on disk.
    """
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin)
    for part in rest:
        package = path.parent
        path = package / part / "__init__.py"
        if not path.is_file():
            path = package / f"{part}.py"
    return path if path.suffix == ".py" and path.is_file() else None


def module_source(name: str) -> str | None:
    """The source text of stdlib module ``name``, read without importing it; None if absent."""
    path = module_path(name)
    return path.read_text(encoding="utf-8") if path is not None else None


def module_pairs(name: str, source: str) -> list[DocPair]:
    """Every usable docstring in ``source`` (module, classes, functions), in source order."""
    pairs: list[DocPair] = []

    def visit(node: ast.AST, prefix: str) -> None:
        if isinstance(node, _DOCSTRING_NODES):
            doc = ast.get_docstring(node, clean=True)
            split = split_docstring(doc) if doc else None
            if split is not None:
                pairs.append(DocPair(f"{name}:{prefix or '<module>'}", *split))
        for child in ast.iter_child_nodes(node):
            child_name = getattr(child, "name", None)
            if isinstance(child, _DOCSTRING_NODES[1:]) and child_name:
                visit(child, f"{prefix}.{child_name}" if prefix else child_name)
            elif isinstance(child, _STATEMENT_NODES):
                visit(child, prefix)  # e.g. definitions inside `if` or `try` blocks

    visit(ast.parse(source), "")
    return pairs


@functools.cache
def corpus(modules: tuple[str, ...] = MODULES) -> tuple[DocPair, ...]:
    """All retrieval pairs from ``modules``, deduplicated by query and by document, in order.

    Duplicates are dropped because a retrieval pair whose document also belongs to another
    query has no single right answer.
    """
    seen_queries: set[str] = set()
    seen_documents: set[str] = set()
    result: list[DocPair] = []
    for name in sorted(modules):
        source = module_source(name)
        if source is None:
            continue
        for pair in module_pairs(name, source):
            if pair.query in seen_queries or pair.document in seen_documents:
                continue
            seen_queries.add(pair.query)
            seen_documents.add(pair.document)
            result.append(pair)
    return tuple(result)


def _rank(pair: DocPair) -> str:
    return hashlib.sha256(pair.key.encode("utf-8")).hexdigest()


def split_corpus(
    pairs: tuple[DocPair, ...], eval_pairs: int = EVAL_PAIRS, calib_pairs: int = CALIB_PAIRS
) -> Splits:
    """Split pairs by the SHA-256 of their key: the lowest hashes are eval, then calib, then train.

    The split depends only on each pair's name, so it is the same on every run. Calibration gets
    both sentences of each of its pairs.
    """
    ranked = sorted(pairs, key=_rank)
    eval_part = ranked[:eval_pairs]
    calib_part = ranked[eval_pairs : eval_pairs + calib_pairs]
    train_part = ranked[eval_pairs + calib_pairs :]
    return Splits(
        calib=tuple(text for pair in calib_part for text in (pair.query, pair.document)),
        train=tuple((pair.query, pair.document) for pair in train_part),
        eval=tuple((pair.query, pair.document) for pair in eval_part),
    )


def docstring_splits() -> Splits:
    """The standard split of the standard corpus, as used by the built-in embedding tasks."""
    return split_corpus(corpus())
