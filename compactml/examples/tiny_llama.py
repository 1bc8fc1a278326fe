"""tiny-llama: a few-million-parameter Llama trained by compactml on the Python stdlib's source.

The architecture is Hugging Face ``transformers``' ``LlamaForCausalLM`` (Touvron et al., 2023,
"LLaMA": pre-norm RMSNorm, rotary position embeddings, SwiGLU MLP, every projection an
``nn.Linear``) at toy size, wrapped in :class:`CausalLM` so that the model returns a plain
logits tensor; its decoder layers are ``model.lm.model.layers``. The tokenizer is a byte-level
BPE (Sennrich et al., 2016; as in GPT-2) trained with ``tokenizers`` on the same training
text, so any text encodes and decodes back exactly. The text is the running interpreter's
standard library (:mod:`compactml.examples.stdlib_text`); whole modules are held out for
evaluation, and the Task's metric is perplexity on them.

Everything is made once per machine (about six minutes on two CPU cores) and cached in
:func:`compactml.cache.cache_dir` as a Hugging Face style folder: ``model.safetensors``,
``config.json`` and ``tokenizer.json``. The folder name carries ``RECIPE_VERSION`` and a digest
of the recipe and the Python version, so changing either trains anew. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import platform
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from compactml.cache import cache_dir
from compactml.errors import CompactMLError
from compactml.examples.hf import HF_EXTRA_HINT, LazyBatches, require_transformers
from compactml.examples.stdlib_text import (
    ModuleSplit,
    evenly_spaced,
    read_texts,
    stdlib_split,
    token_stream,
    windows,
)
from compactml.io import atomic_write_bytes, atomic_write_text
from compactml.progress import progress_bar
from compactml.source import set_source
from compactml.task import Task, causal_lm_loss

NAME = "tiny-llama"
RECIPE_VERSION = 1
EOS = "<|endoftext|>"  # token 0: separates modules in the token stream
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
CALIB_SEQUENCES, CALIB_BATCH = 128, 8
EVAL_SEQUENCES, EVAL_BATCH = 256, 16
#: config.json fields that must match the recipe for a cached folder to be used as is.
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything that decides the trained model: architecture, data, optimization.

    AdamW (Loshchilov & Hutter, 2019) with linear warmup then cosine decay to a tenth of the
    peak rate; one pass over ``steps * batch_size`` windows of ``context`` tokens. The
    ``max_*_modules`` caps keep only the first few modules of each split (small test corpora).
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 640  # a multiple of 128: quantization groups of 64 and 128 fit
    layers: int = 4
    heads: int = 8
    context: int = 128
    batch_size: int = 16
    steps: int = 800
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    max_train_modules: int | None = None
    max_eval_modules: int | None = None

    def key(self) -> str:
        """A short digest of the recipe and the Python version (whose stdlib is the data)."""
        fields = {**asdict(self), "python": platform.python_version_tuple()[:2]}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    def modules(self) -> ModuleSplit:
        """The stdlib modules this recipe trains and evaluates on."""
        return stdlib_split(self.max_train_modules, self.max_eval_modules)


RECIPE = Recipe()


def require_tokenizers() -> Any:
    """Import and return ``tokenizers``, or raise a CompactMLError naming the extra to install."""
    try:
        import tokenizers
    except ImportError as exc:
        raise CompactMLError(f"{NAME} needs the 'hf' extra: {HF_EXTRA_HINT}") from exc
    return tokenizers


def llama_config(recipe: Recipe | None = None) -> Any:
    """The ``transformers.LlamaConfig`` of ``recipe`` (default: :data:`RECIPE`)."""
    recipe = recipe or RECIPE
    transformers = require_transformers(NAME)
    return transformers.LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.context,
        tie_word_embeddings=False,
        use_cache=False,  # outputs hold logits only, no key/value cache object
        bos_token_id=0,
        eos_token_id=0,
    )


class CausalLM(nn.Module):
    """A Hugging Face causal LM (``self.lm``) that returns its logits ``(batch, time, vocab)``.

    A plain tensor output and a two-argument forward keep every compactml tool (evaluation,
    profiling, ONNX export) free of Hugging Face output objects and keyword options. When no
    attention mask is given an all-ones mask is passed: without one, transformers looks for
    packed sequences in the position ids with ``torch.diff``, which ONNX cannot express.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits for token ids ``(batch, time)``; the mask marks real tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def new_model(recipe: Recipe | None = None) -> CausalLM:
    """A :class:`CausalLM` around a ``LlamaForCausalLM`` with seeded random weights; the
    global random state is untouched."""
    recipe = recipe or RECIPE
    transformers = require_transformers(NAME)
    config = llama_config(recipe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return CausalLM(transformers.LlamaForCausalLM(config))


def build() -> nn.Module:
    """The architecture only, with random weights (no training), in eval mode."""
    return new_model().eval()


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``; deterministic.

    Token 0 is :data:`EOS`; the 256 byte symbols are always in the vocabulary, so every text
    encodes, and ``decode(encode(text).ids) == text``.
    """
    tokenizers = require_tokenizers()
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = byte_level(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=byte_level.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _batches(rows: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, labels)`` batches; labels are the same ids (the loss shifts them)."""
    return [(rows[i : i + size], rows[i : i + size]) for i in range(0, len(rows), size)]


class StdlibTokens:
    """The recipe's module split, tokenized on first use (a few seconds for the full stdlib)."""

    def __init__(self, recipe: Recipe, tokenizer: Any) -> None:
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.split = recipe.modules()

    @cached_property
    def train_windows(self) -> torch.Tensor:
        """All training text as ``(n, context)`` windows, in module order."""
        texts = read_texts(self.split.root, self.split.train)
        return windows(token_stream(self.tokenizer, texts, EOS), self.recipe.context)

    @cached_property
    def eval_windows(self) -> torch.Tensor:
        """All held-out text as ``(n, context)`` windows, in module order."""
        texts = read_texts(self.split.root, self.split.eval)
        return windows(token_stream(self.tokenizer, texts, EOS), self.recipe.context)

    def first_window(self) -> torch.Tensor:
        """The first training window ``(1, context)``, tokenizing only as many modules as needed."""
        stream = torch.zeros(0, dtype=torch.long)
        for name in self.split.train:
            text = read_texts(self.split.root, (name,))
            stream = torch.cat([stream, token_stream(self.tokenizer, text, EOS)])
            if len(stream) >= self.recipe.context:
                return stream[None, : self.recipe.context]
        raise CompactMLError(
            f"the {NAME} training text has fewer than {self.recipe.context} tokens; "
            "raise max_train_modules in the recipe"
        )

    def train_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every training window once, in a fixed shuffled order, in the recipe's batch size."""
        rows = self.train_windows
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.recipe.seed))
        return _batches(rows[order], self.recipe.batch_size)


def make_task(tokens: StdlibTokens) -> Task:
    """The perplexity Task over ``tokens``; every split is tokenized on first use.

    calib: 128 training windows spread over the training text; train: every training window
    (shuffled once); eval: up to 256 windows spread over the held-out modules; example: the
    first calibration window, shaped ``(1, context)``.
    """
    return Task(
        calib=LazyBatches(
            lambda: _batches(evenly_spaced(tokens.train_windows, CALIB_SEQUENCES), CALIB_BATCH)
        ),
        train=LazyBatches(tokens.train_batches),
        eval=LazyBatches(
            lambda: _batches(evenly_spaced(tokens.eval_windows, EVAL_SEQUENCES), EVAL_BATCH)
        ),
        metric="perplexity",
        example=tokens.first_window(),
        name=NAME,
    )


def _schedule(recipe: Recipe, step: int) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay from 1 to 0.1."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(tokens: StdlibTokens, progress: bool = True) -> CausalLM:
    """Train a fresh model with ``tokens.recipe`` on the training windows; eval mode on return.

    The global torch random state is saved and restored, so calling this has no side effects.
    """
    recipe = tokens.recipe
    batches = tokens.train_batches()
    if not batches:
        raise CompactMLError(f"no {NAME} training windows; raise max_train_modules in the recipe")
    model = new_model(recipe).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm gains
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay}]
    optimizer = torch.optim.AdamW(groups, lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(recipe, s))
    steps = itertools.islice(itertools.cycle(batches), recipe.steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        bar = progress_bar(steps, f"training {NAME} (once)", recipe.steps, enabled=progress)
        for input_ids, labels in bar:
            optimizer.zero_grad(set_to_none=True)
            causal_lm_loss(model(input_ids), labels).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
    return model.eval()


def cache_folder(recipe: Recipe | None = None) -> Path:
    """The cache folder of ``recipe``'s model; its name carries the version and recipe digest."""
    recipe = recipe or RECIPE
    return cache_dir() / f"{NAME}-v{RECIPE_VERSION}-{recipe.key()}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_tokenizer(path: Path, recipe: Recipe) -> tuple[Any, str] | None:
    """The cached tokenizer and its JSON text, or None (with a warning) when it is missing or
    unusable."""
    if not path.is_file():
        return None
    tokenizers = require_tokenizers()
    try:
        text = path.read_text(encoding="utf-8")
        tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises plain Exception on bad JSON
        log.warning("cached %s tokenizer %s is unreadable (%s); retraining", NAME, path, exc)
        return None
    if tokenizer.token_to_id(EOS) != 0 or tokenizer.get_vocab_size() > recipe.vocab_size:
        log.warning("cached %s tokenizer %s does not fit the recipe; retraining", NAME, path)
        return None
    return tokenizer, text


def _tokenizer_and_text(recipe: Recipe) -> tuple[Any, str]:
    path = cache_folder(recipe) / TOKENIZER
    cached = _read_tokenizer(path, recipe)
    if cached is not None:
        return cached
    split = recipe.modules()
    tokenizer = train_tokenizer(read_texts(split.root, split.train), recipe.vocab_size)
    text = tokenizer.to_str()
    atomic_write_text(path, text)
    return tokenizer, text


def cached_tokenizer(recipe: Recipe | None = None) -> Any:
    """The recipe's ``tokenizers.Tokenizer``: read from the cache, or trained (seconds) and
    cached as tokenizer.json."""
    return _tokenizer_and_text(recipe or RECIPE)[0]


def _read_weights(path: Path, recipe: Recipe, tokenizer_sha: str) -> CausalLM | None:
    """The cached model, or None (with a warning) when missing, damaged or not for this
    tokenizer."""
    if not path.is_file():
        return None
    model = new_model(recipe)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        model.lm.load_state_dict(state, strict=True)  # Hugging Face names, no prefix
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
        log.warning("cached %s weights in %s are unreadable (%s); retraining", NAME, path, exc)
        return None
    if metadata.get("tokenizer_sha256") != tokenizer_sha:
        log.warning("cached %s weights in %s fit another tokenizer; retraining", NAME, path)
        return None
    if not all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()):
        log.warning("cached %s weights in %s hold NaN/Inf; retraining", NAME, path)
        return None
    return model.eval()


def _config_ok(path: Path, recipe: Recipe) -> bool:
    """Whether the cached config.json parses and describes the recipe's architecture."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = llama_config(recipe).to_dict()
    return isinstance(stored, dict) and all(stored.get(k) == expected[k] for k in CONFIG_FIELDS)


def _write_config(folder: Path, recipe: Recipe) -> None:
    atomic_write_text(folder / CONFIG, llama_config(recipe).to_json_string(use_diff=False))


def _write_weights(path: Path, model: CausalLM, recipe: Recipe, tokenizer_sha: str) -> None:
    state = {key: value.contiguous() for key, value in model.lm.state_dict().items()}
    metadata = {
        "format": "pt",  # lets transformers' from_pretrained read the folder too
        "recipe_version": str(RECIPE_VERSION),
        "recipe": json.dumps(asdict(recipe), sort_keys=True),
        "tokenizer_sha256": tokenizer_sha,
    }
    atomic_write_bytes(path, save(state, metadata=metadata))


def task(tokenizer: Any | None = None) -> Task:
    """The perplexity Task alone (tokenizer from the cache, or trained; the model is not)."""
    return make_task(StdlibTokens(RECIPE, tokenizer or cached_tokenizer(RECIPE)))


def load(progress: bool = True) -> tuple[nn.Module, Task]:
    """The trained model (eval mode) and its Task; trains and caches both on first use.

    A damaged or mismatched cache file is replaced (with a warning), never trusted: the
    tokenizer is retrained when unreadable, the weights when unreadable, non-finite or made
    with another tokenizer, and config.json is rewritten when it does not fit.
    """
    recipe = RECIPE
    folder = cache_folder(recipe)
    tokenizer, tokenizer_text = _tokenizer_and_text(recipe)
    tokenizer_sha = _sha256(tokenizer_text)
    tokens = StdlibTokens(recipe, tokenizer)
    model = _read_weights(folder / WEIGHTS, recipe, tokenizer_sha)
    if model is None:
        model = train(tokens, progress=progress)
        _write_config(folder, recipe)
        _write_weights(folder / WEIGHTS, model, recipe, tokenizer_sha)
    elif not _config_ok(folder / CONFIG, recipe):
        log.warning("cached %s config %s does not fit; rewriting it", NAME, folder / CONFIG)
        _write_config(folder, recipe)
    set_source(model, {"kind": "builtin", "name": NAME})
    return model, make_task(tokens)
