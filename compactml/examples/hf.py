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
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.errors import CompactMLError, first_line
from compactml.examples.docstrings import docstring_splits
from compactml.source import set_source
from compactml.task import Task

HF_EXTRA_HINT = "pip install 'compactml[hf]'"
MAX_LENGTH = 128
BATCH_SIZE = 32
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
#: Files of which a saved tokenizer has at least one (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
MAX_KEYS_SHOWN = 3  # tensor names quoted in a loading error

log = logging.getLogger(__name__)


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
def quiet_transformers(progress: bool) -> Iterator[None]:
    """For the duration of a block: transformers' progress bars on or off, and its warnings
    (such as the LOAD REPORT it prints for missing weights) silenced; both restored after.

    compactml checks the loading info itself and raises one clear error instead.
    """
    from transformers.utils import logging as hf_logging

    library_logger = logging.getLogger("transformers")
    was_level = library_logger.level
    was_bar = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
    library_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        library_logger.setLevel(was_level)
        (hf_logging.enable_progress_bar if was_bar else hf_logging.disable_progress_bar)()


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
    if not has_weights(folder):
        raise CompactMLError(
            f"{folder} has no model.safetensors; save the model with "
            "save_pretrained(folder, safe_serialization=True) (pickled .bin weights are not read)"
        )


def has_weights(folder: Path) -> bool:
    """True when ``folder`` holds safetensors weights (one file or a sharded index)."""
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def json_config(config: Any) -> dict:
    """A transformers config as a JSON-safe dict (what an artifact's manifest can store)."""
    return json.loads(config.to_json_string(use_diff=False))


def _some(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > MAX_KEYS_SHOWN else shown


def loading_problems(info: dict, module_names: Sequence[str]) -> list[str]:
    """Describe what ``from_pretrained(output_loading_info=True)`` could not load, or [].

    Missing and mis-shaped tensors were filled with random values by transformers, so they are
    always problems. Unexpected tensors are problems when they belong to the model's own
    modules ``module_names`` (e.g. a layer the config no longer has); tensors of a task head
    the encoder does not have (``classifier.*`` of a fine-tuned classifier) are not.
    """
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(
        key for key in info.get("unexpected_keys") or () if key.split(".")[0] in module_names
    )
    mismatched = sorted(
        f"{key} (file {list(stored)}, config {list(wanted)})"
        for key, stored, wanted in info.get("mismatched_keys") or ()
    )
    named = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
    return [f"{label}: {_some(keys)}" for label, keys in named if keys]


def load_encoder(folder: Path, progress: bool = True) -> nn.Module:
    """The transformers model saved in ``folder``, every weight read from its safetensors.

    Raises CompactMLError when the weights cannot be read or do not fit the config (tensors
    missing, unexpected or of the wrong shape), where transformers would instead fill the gaps
    with random values. Runs no remote code and downloads nothing.
    """
    transformers = require_transformers("loading a Hugging Face folder")
    try:
        with quiet_transformers(progress):
            encoder, info = transformers.AutoModel.from_pretrained(
                str(folder),
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # report mis-shaped tensors below, by name
            )
    except CompactMLError:
        raise
    except Exception as exc:
        raise CompactMLError(
            f"cannot load the Hugging Face model in {folder} ({first_line(exc)}); "
            "check that it holds a complete save_pretrained() model"
        ) from exc
    problems = loading_problems(info, [name for name, _ in encoder.named_children()])
    if problems:
        raise CompactMLError(
            f"the weights in {folder} do not fit its config.json ({'; '.join(problems)}); "
            "restore the folder or save the model again with save_pretrained()"
        )
    return encoder


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder`` (local files only, no remote code)."""
    transformers = require_transformers("loading a Hugging Face tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except CompactMLError:
        raise
    except Exception as exc:
        raise CompactMLError(
            f"cannot load the tokenizer in {folder} ({first_line(exc)}); "
            "save it there with tokenizer.save_pretrained(folder)"
        ) from exc


def load_folder(path: str | Path, progress: bool = True) -> tuple[nn.Module, Task]:
    """Load a local Hugging Face model folder as a :class:`SentenceEncoder` and its Task.

    The folder needs ``config.json``, safetensors weights that fit it, and a tokenizer. No
    remote code is run and nothing is downloaded. The Task is the docstring retrieval task.
    ``progress=False`` silences transformers' weight-loading bar.
    """
    folder = Path(path).resolve()
    _check_folder(folder)
    encoder = load_encoder(folder, progress=progress)
    tokenizer = load_tokenizer(folder)
    model = SentenceEncoder(encoder).eval()
    source = {
        "kind": "hf",
        "path": str(folder),
        "class": type(encoder).__name__,
        "config": json_config(encoder.config),
    }
    set_source(model, source)
    return model, embedding_task(tokenizer, reference_copy(model), name=folder.name)


def _original_reference(folder: Path, source: dict) -> nn.Module | None:
    """The model still saved in ``folder`` if it is the one ``source`` describes, else None."""
    if not has_weights(folder):
        return None
    try:
        encoder = load_encoder(folder, progress=False)
    except CompactMLError as exc:
        log.warning("no reference model for %s: %s", folder, exc)
        return None
    if json_config(encoder.config) != source.get("config"):
        log.warning("no reference model: %s changed since the artifact was made", folder)
        return None
    return reference_copy(SentenceEncoder(encoder))


def task_from_source(source: dict, limit: int | None = None) -> Task | None:
    """The docstring Task for a model made from a Hugging Face folder, or None.

    ``source`` is a ``{"kind": "hf", "path": folder, ...}`` source (as stored in an artifact).
    The Task is tokenized with the folder's tokenizer; its reference is the original model when
    the folder still holds it unchanged (fidelity is measured against it), else None. Returns
    None when the source is not a folder's, or the folder or its tokenizer is gone or unreadable.
    ``limit`` caps the examples per split.
    """
    path = source.get("path") if source.get("kind") == "hf" else None
    folder = Path(path) if isinstance(path, str) else None
    if folder is None or not folder.is_dir():
        return None
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        tokenizer = load_tokenizer(folder)
    except CompactMLError as exc:
        log.warning("no task for %s: %s", folder, exc)
        return None
    reference = _original_reference(folder, source)
    return embedding_task(tokenizer, reference, limit=limit, name=folder.name)


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
