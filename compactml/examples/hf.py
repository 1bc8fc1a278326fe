"""Hugging Face sentence encoders: a pooling wrapper, folder loading, and the embedding Task.

A Hugging Face encoder returns one vector per token; a sentence-transformers model such as
all-MiniLM-L6-v2 turns them into one vector per sentence by averaging over the real (unpadded)
tokens and scaling to unit length. :class:`SentenceEncoder` does exactly that in plain PyTorch,
so every compactml technique sees an ordinary ``nn.Module`` whose output is the embedding.

Nothing here downloads: models and tokenizers are read from local folders only.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.errors import CompactMLError
from compactml.examples.docstrings import docstring_splits
from compactml.source import set_source
from compactml.task import Task

HF_EXTRA_HINT = "pip install 'compactml[hf]'"
MAX_LENGTH = 128
BATCH_SIZE = 32
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class SentenceEncoder(nn.Module):
    """Token encoder + mean pooling over the attention mask (+ L2 normalization).

    This is the pooling of sentence-transformers' ``Pooling(mean)`` and ``Normalize`` modules
    (Reimers & Gurevych, 2019, "Sentence-BERT"). Output: ``(batch, hidden)`` float embeddings,
    unit length when ``normalize`` is true.
    """

    def __init__(self, encoder: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed a tokenized batch: ids ``(batch, seq)`` -> embeddings ``(batch, hidden)``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        outputs = self.encoder(**kwargs)
        tokens = outputs[0] if isinstance(outputs, (tuple, list)) else outputs.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


class LazyBatches:
    """A re-iterable list of batches made on first use (tokenizing takes a moment)."""

    def __init__(self, make: Callable[[], list]) -> None:
        self._make = make
        self._batches: list | None = None

    def _get(self) -> list:
        if self._batches is None:
            self._batches = self._make()
        return self._batches

    def __iter__(self) -> Iterator:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Turn transformers' progress bars on or off for the duration of a block, then restore."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def require_transformers(what: str) -> Any:
    """Import and return ``transformers``, or raise a CompactMLError naming the extra to install."""
    try:
        import transformers
    except ImportError as exc:
        raise CompactMLError(f"{what} needs the 'hf' extra: {HF_EXTRA_HINT}") from exc
    return transformers


def tokenize(tokenizer: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` into a plain dict ``{input_ids, attention_mask[, token_type_ids]}``.

    Padded to the longest text, truncated to ``MAX_LENGTH`` tokens. A plain dict (not a
    ``BatchEncoding``) so that Task and export code see the usual keyword-argument inputs.
    """
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {key: encoded[key] for key in keys if key in encoded}


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _pair_batches(tokenizer: Any, pairs: Sequence[tuple[str, str]], size: int) -> list[tuple]:
    return [
        (tokenize(tokenizer, [q for q, _ in chunk]), tokenize(tokenizer, [d for _, d in chunk]))
        for chunk in _chunks(pairs, size)
    ]


def embedding_task(
    tokenizer: Any,
    reference: nn.Module | None,
    limit: int | None = None,
    batch_size: int = BATCH_SIZE,
    name: str = "docstrings",
) -> Task:
    """The docstring retrieval Task (``metric="embedding"``) tokenized with ``tokenizer``.

    calib: batches of sentence inputs; train and eval: ``(query_inputs, document_inputs)``
    batches; ``limit`` caps the number of sentences or pairs in each split (for quick runs).
    ``reference`` is the uncompressed model that fidelity is measured against.
    """
    if limit is not None and limit < 1:
        raise CompactMLError(f"limit must be a positive number of examples, got {limit}")
    splits = docstring_splits()
    calib, train, evals = (list(part[:limit]) for part in (splits.calib, splits.train, splits.eval))
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers often ship without one
    return Task(
        calib=LazyBatches(lambda: [tokenize(tokenizer, c) for c in _chunks(calib, batch_size)]),
        train=LazyBatches(lambda: _pair_batches(tokenizer, train, batch_size)),
        eval=LazyBatches(lambda: _pair_batches(tokenizer, evals, batch_size)),
        metric="embedding",
        example=tokenize(tokenizer, calib[:1]),
        reference=reference,
        name=name,
    )


def reference_copy(model: nn.Module) -> nn.Module:
    """A separate, frozen, eval-mode copy of ``model`` to measure compressed models against."""
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CompactMLError(f"model folder {folder} does not exist; check the path")
    if not (folder / "config.json").is_file():
        raise CompactMLError(
            f"{folder} has no config.json; give a Hugging Face model folder (save_pretrained)"
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise CompactMLError(
            f"{folder} has no model.safetensors; save the model with "
            "save_pretrained(folder, safe_serialization=True) (pickled .bin weights are not read)"
        )


def json_config(config: Any) -> dict:
    """A transformers config as a JSON-safe dict (what an artifact's manifest can store)."""
    return json.loads(config.to_json_string(use_diff=False))


def load_folder(path: str | Path, progress: bool = True) -> tuple[nn.Module, Task]:
    """Load a local Hugging Face model folder as a :class:`SentenceEncoder` and its Task.

    The folder needs ``config.json``, safetensors weights and a tokenizer. No remote code is
    run and nothing is downloaded. The Task is the docstring retrieval task.
    ``progress=False`` silences transformers' weight-loading bar.
    """
    folder = Path(path).resolve()
    _check_folder(folder)
    transformers = require_transformers("loading a Hugging Face folder")
    try:
        with transformers_progress(progress):
            encoder = transformers.AutoModel.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=True
            )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompactMLError(
            f"cannot load the Hugging Face model in {folder} ({reason}); "
            "check that it holds a complete save_pretrained() model and tokenizer"
        ) from exc
    model = SentenceEncoder(encoder).eval()
    source = {
        "kind": "hf",
        "path": str(folder),
        "class": type(encoder).__name__,
        "config": json_config(encoder.config),
    }
    set_source(model, source)
    return model, embedding_task(tokenizer, reference_copy(model), name=folder.name)


def _model_class(transformers: Any, name: str | None) -> Any:
    """The transformers model class called ``name``, or None when there is no such class."""
    if not name or not name.isidentifier():
        return None
    cls = getattr(transformers, name, None)
    base = transformers.PreTrainedModel
    return cls if isinstance(cls, type) and issubclass(cls, base) else None


def build_from_source(source: dict) -> nn.Module:
    """Rebuild the :class:`SentenceEncoder` architecture from an ``{"kind": "hf"}`` source.

    Uses the stored config only (random weights, to be overwritten by the artifact's); the
    class is looked up by name in the ``transformers`` module, falling back to ``AutoModel``.
    """
    transformers = require_transformers("rebuilding a Hugging Face model")
    config_dict = dict(source.get("config") or {})
    model_type = config_dict.pop("model_type", None)
    if not model_type:
        raise CompactMLError(
            "the artifact's Hugging Face source has no model config; pass model= to cml.load"
        )
    try:
        config = transformers.AutoConfig.for_model(model_type, **config_dict)
    except (ValueError, KeyError) as exc:
        raise CompactMLError(
            f"this transformers version does not know model type {model_type!r}; "
            "upgrade transformers or pass model= to cml.load"
        ) from exc
    cls = _model_class(transformers, source.get("class"))
    encoder = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    return SentenceEncoder(encoder).eval()
