"""The stdlib docstring corpus: deterministic, sizeable, read without importing anything."""

import sys

from compactml.examples import docstrings


def test_corpus_is_deterministic_across_builds():
    first = docstrings.corpus()
    docstrings.corpus.cache_clear()
    second = docstrings.corpus()
    assert first == second and first is not second
    assert docstrings.split_corpus(first) == docstrings.split_corpus(second)


def test_corpus_has_real_pairs_with_distinct_query_and_document():
    pairs = docstrings.corpus()
    assert len(pairs) >= 900
    assert len({p.key.split(":")[0] for p in pairs}) >= 30  # many modules contribute
    for pair in pairs:
        assert len(pair.query) >= docstrings.MIN_QUERY_CHARS
        assert docstrings.MIN_DOCUMENT_CHARS <= len(pair.document)
        assert len(pair.document) <= docstrings.MAX_DOCUMENT_CHARS
        assert pair.query.lower().rstrip(" .") not in pair.document.lower()
        assert "\n" not in pair.document and "  " not in pair.document
    assert len({p.query for p in pairs}) == len(pairs) == len({p.document for p in pairs})


def test_split_sizes_and_disjointness():
    splits = docstrings.docstring_splits()
    assert len(splits.eval) == docstrings.EVAL_PAIRS == 512
    assert len(splits.calib) == 2 * docstrings.CALIB_PAIRS == 256
    assert len(splits.train) >= 100
    eval_queries = {q for q, _ in splits.eval}
    train_queries = {q for q, _ in splits.train}
    assert not eval_queries & train_queries
    assert not eval_queries & set(splits.calib)


def test_split_depends_on_keys_not_on_order():
    pairs = docstrings.corpus()
    forward = docstrings.split_corpus(pairs, eval_pairs=50, calib_pairs=10)
    backward = docstrings.split_corpus(tuple(reversed(pairs)), eval_pairs=50, calib_pairs=10)
    assert set(forward.eval) == set(backward.eval)


def test_modules_are_parsed_not_imported(monkeypatch):
    for name in ("turtle", "imaplib"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    docstrings.corpus.cache_clear()
    pairs = docstrings.corpus()
    assert any(p.key.startswith("turtle:") for p in pairs)
    assert "turtle" not in sys.modules and "imaplib" not in sys.modules


def test_split_docstring_rules():
    assert docstrings.split_docstring("Too short.\n\nBut a long enough body " + "x" * 60) is None
    assert docstrings.split_docstring("A summary line that is long enough.") is None
    long_body = "word " * 200
    query, document = docstrings.split_docstring(
        "A summary line that is long enough.\n\n" + long_body
    )
    assert query == "A summary line that is long enough."
    assert len(document) <= docstrings.MAX_DOCUMENT_CHARS and document.endswith("word")
    first_line = "Summary on one line, then no blank line.\n" + "body " * 20
    assert docstrings.split_docstring(first_line)[0] == "Summary on one line, then no blank line."


def test_missing_modules_are_skipped():
    assert docstrings.module_path("no_such_module_xyz.sub") is None
    assert docstrings.module_path("sys") is None  # built in: no source file
    assert docstrings.corpus(("no_such_module_xyz", "fnmatch"))
