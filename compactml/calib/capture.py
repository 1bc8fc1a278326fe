"""Block-by-block calibration: capture the inputs of one block, compress it, move on.

Calibration-based methods (GPTQ, and later SparseGPT, Wanda, AWQ) need the inputs of every
layer they compress. Running the whole model with hooks on every layer would hold statistics
for all of them at once; instead :func:`run_blockwise` follows the layer-wise recipe of GPTQ
(Frantar et al. 2022, section 5) and llm-compressor's sequential pipeline:

1. :func:`find_blocks` finds the repeated blocks generically: the largest ``nn.ModuleList``
   (by parameter count) whose children all have the same type, such as
   ``BertModel.encoder.layer`` or ``LlamaModel.layers``. A probe forward pass on the first
   calibration batch checks that they run one after the other, each on the hidden state the
   previous one returned; if not (or there is no such list) the whole model is one block.
2. :func:`capture_inputs` runs every calibration batch until it reaches the first block, whose
   forward pre-hook records the call's positional and keyword arguments (attention masks,
   position embeddings, rotary cos/sin, cache flags) and stops the forward pass, so nothing
   after it runs. Key/value cache objects are replaced by None and ``use_cache`` by False, so
   running a block again does not grow a cache.
3. For each block: ``step(Block)`` (the method's callback) hooks the block's layers with
   :func:`collect`, which runs the block on every captured input to accumulate statistics
   (:mod:`compactml.calib.stats`), then compresses them in place; the runner then runs the
   *compressed* block on the captured inputs to produce the next block's inputs (element 0
   of a tuple output is the hidden state; the other arguments are kept).
4. The layers outside the blocks (a pooler, a classifier, an ``lm_head``, a projection before
   the blocks) are handled last, as one more :class:`Block`: the whole, already compressed
   model, whose ``forward`` runs every calibration batch through ``task.run``, with the blocks'
   own layers left out of :meth:`Block.named_modules`. This pass holds the activations of one
   batch at a time, so memory still does not grow with depth.

Padding is not data: when a calibration batch is a mapping with a 2-D ``attention_mask`` (what
Hugging Face tokenizers return), :func:`collect` feeds the accumulators only the real tokens of
each ``(batch, sequence, features)`` input (:func:`real_tokens`). On the docstring task, 70% of
the positions of MiniLM's padded calibration batches are padding; counting their hidden states
would bend every method's statistics toward positions the model never uses.

Peak memory is one block's statistics plus the captured activations of one block boundary,
not the depth of the model.

Replaying the first block's captured arguments to every block assumes the blocks form a chain
that shares those arguments (true of Hugging Face encoders and decoders). A model whose blocks
are not a chain, or that hands later blocks different arguments (T5's position bias computed
by the first block), is calibrated as one unit, with a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compactml.errors import CompactMLError, first_line
from compactml.progress import progress_bar
from compactml.task import Task, describe, eval_mode, split_batch

RUN_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)

# The real-token mask of the calibration batch being run (None: every position is real).
_TOKENS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "compactml_calib_tokens", default=None
)


def token_mask(inputs: Any) -> torch.Tensor | None:
    """The real (non-padding) positions of a calibration batch: its ``attention_mask`` when
    the inputs are a mapping holding a 2-D ``(batch, sequence)`` one, as Hugging Face
    tokenizers give; otherwise None (every position counts)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask != 0


def real_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` without the padding positions of the batch being run: ``x[mask]`` (tokens by
    features) when ``x`` starts with the batch's ``(batch, sequence)`` shape, else ``x``."""
    mask = _TOKENS.get()
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(x.device)]


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass at the first block."""


def _is_cache(value: Any) -> bool:
    """True for a Hugging Face key/value cache object (a subclass of a class named Cache)."""
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


def _clean(value: Any, key: str | None = None) -> Any:
    if key == "use_cache":
        return False
    return None if _is_cache(value) else value


@dataclass
class Call:
    """The arguments of one call of a block: ``module(*args, **kwargs)``; ``slot`` is where
    the hidden state sits (an index into ``args`` or a keyword); ``tokens`` is the batch's
    real-token mask (:func:`token_mask`)."""

    args: tuple
    kwargs: dict[str, Any]
    slot: int | str
    tokens: torch.Tensor | None = None

    @classmethod
    def record(cls, args: tuple, kwargs: dict[str, Any]) -> Call | None:
        """The call with caches removed, or None when no tensor argument holds a hidden state."""
        args = tuple(_clean(a) for a in args)
        kwargs = {k: _clean(v, k) for k, v in kwargs.items()}
        if args and isinstance(args[0], torch.Tensor):
            return cls(args, kwargs, 0)
        names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        if not names:
            return None
        return cls(args, kwargs, "hidden_states" if "hidden_states" in names else names[0])

    def hidden(self) -> torch.Tensor:
        """The hidden-state argument."""
        return self.args[self.slot] if isinstance(self.slot, int) else self.kwargs[self.slot]

    def with_hidden(self, hidden: torch.Tensor) -> Call:
        """The same call with ``hidden`` as its hidden state."""
        if isinstance(self.slot, int):
            args = self.args[: self.slot] + (hidden,) + self.args[self.slot + 1 :]
            return Call(args, self.kwargs, self.slot, self.tokens)
        return Call(self.args, self.kwargs | {self.slot: hidden}, self.slot, self.tokens)

    def run(self, module: nn.Module) -> torch.Tensor:
        """The hidden state ``module`` returns for this call (its token mask current meanwhile,
        for :func:`real_tokens`)."""
        with padding_of(self.tokens):
            return hidden_output(module(*self.args, **self.kwargs))


@contextlib.contextmanager
def padding_of(tokens: torch.Tensor | None) -> Iterator[None]:
    """Make ``tokens`` the real-token mask :func:`real_tokens` applies, for the block."""
    reset = _TOKENS.set(tokens)
    try:
        yield
    finally:
        _TOKENS.reset(reset)


def hidden_output(output: Any) -> torch.Tensor:
    """The hidden state in a block's output: the tensor itself, or element 0 of a tuple/list
    (or of a Hugging Face ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    first = output[0] if isinstance(output, tuple | list) and output else None
    if first is None and hasattr(output, "to_tuple"):
        first = output.to_tuple()[0]
    if not isinstance(first, torch.Tensor):
        raise CompactMLError(
            f"a block returned {type(output).__name__} without a tensor first; blocks must "
            "return the hidden state (or a tuple starting with it)"
        )
    return first


@dataclass
class Block:
    """One unit of block-by-block calibration handed to a method's step.

    ``name``: its dotted name in the model (``""`` for the model itself); ``module``: the block;
    ``forward()``: runs it on every calibration input; ``skip``: names of modules inside
    ``module`` that belong to other blocks (the final, model-level unit skips the blocks)."""

    name: str
    module: nn.Module
    forward: Callable[[], None]
    skip: tuple[str, ...] = field(default_factory=tuple)

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """``(full name in the model, module)`` of every module of this unit."""
        prefix = f"{self.name}." if self.name else ""
        for name, module in self.module.named_modules():
            full = f"{prefix}{name}" if name else self.name
            if not any(full == s or full.startswith(f"{s}.") for s in self.skip):
                yield full, module


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks: children of the ``nn.ModuleList`` with the most parameters (then
    the most children) whose children all have one type; ``[]`` when there is none."""
    best, best_key = None, (0, 0)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(child) for child in module}) != 1:
            continue
        key = (sum(p.numel() for p in module.parameters()), len(module))
        if key > best_key:
            best, best_key = name, key
    if best is None:
        return []
    return [(f"{best}.{i}", child) for i, child in enumerate(model.get_submodule(best))]


def run_checked(model: nn.Module, task: Task, inputs: Any, who: str) -> None:
    """``task.run(model, inputs)``; a failure names the batch's shapes (the capture stop
    passes through)."""
    try:
        task.run(model, inputs)
    except _StopForward:
        raise
    except RUN_ERRORS as exc:
        raise CompactMLError(
            f"{who} cannot run the model on the calibration batch {describe(inputs)} "
            f"({first_line(exc)}); give calibration batches shaped as the model expects"
        ) from exc


def _first_inputs(task: Task, who: str) -> Any:
    if not isinstance(task, Task) or not task.has("calib"):
        raise CompactMLError(
            f"{who} needs calibration data; pass a Task(calib=[batches...]) as the task"
        )
    batch = next(task.batches("calib"), None)
    if batch is None:
        raise CompactMLError(f"the task's calib data is empty; {who} needs calibration batches")
    return split_batch(batch)[0]


def _same(a: Any, b: Any) -> bool:
    """Whether two block arguments are the same: one object, equal plain values, or tuples
    of such."""
    if a is b:
        return True
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    plain = (bool, int, float, str)
    return isinstance(a, plain) and type(a) is type(b) and a == b


class _Probe:
    """Hooks that check one forward pass calls the blocks once each, in order, each on the
    hidden state the previous one returned and with the first block's other arguments (what
    replaying the first block's captured arguments to every block assumes)."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.ok = True
        self.first: Call | None = None
        self.last: Any = None  # a weak reference to the previous block's output

    def before(self, index: int, args: tuple, kwargs: dict) -> None:
        call = Call.record(args, kwargs)
        previous = self.last() if self.last is not None else None
        if call is None or (self.order and call.hidden() is not previous):
            self.ok = False
        elif self.first is None:
            self.first = call
        elif not self._same_arguments(call):
            self.ok = False
        self.order.append(index)

    def _same_arguments(self, call: Call) -> bool:
        first = self.first
        hidden = object()
        a = first.with_hidden(hidden)  # compare everything but the hidden state
        b = call.with_hidden(hidden)
        return (
            first.slot == call.slot
            and _same(a.args, b.args)
            and (
                a.kwargs.keys() == b.kwargs.keys()
                and all(_same(a.kwargs[k], b.kwargs[k]) for k in a.kwargs)
            )
        )

    def after(self, output: Any) -> None:
        try:
            self.last = weakref.ref(hidden_output(output))
        except CompactMLError:
            self.ok = False


def _runs_in_sequence(model: nn.Module, blocks: list, task: Task, inputs: Any, who: str) -> bool:
    """Whether one forward pass on ``inputs`` runs ``blocks`` as a chain (see :class:`_Probe`)."""
    probe = _Probe()
    handles = []
    for i, (_, block) in enumerate(blocks):
        hook = functools.partial(lambda i, m, a, k: probe.before(i, a, k), i)
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, out: probe.after(out)))
    try:
        run_checked(model, task, inputs, who)
    finally:
        for handle in handles:
            handle.remove()
    return probe.ok and probe.order == list(range(len(blocks)))


def capture_inputs(
    model: nn.Module, block: nn.Module, task: Task, batches: int | None, who: str
) -> list[Call]:
    """The arguments ``block`` is called with for each calibration batch; each forward pass
    stops at ``block`` (a forward pre-hook raises), so nothing after it runs."""
    calls: list[Call] = []

    tokens: torch.Tensor | None = None

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = Call.record(args, kwargs)
        if call is None:
            raise CompactMLError(f"{who}: the first block was called without a tensor input")
        call.tokens = tokens
        calls.append(call)
        raise _StopForward

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in task.batches("calib", limit=batches):
            inputs = split_batch(batch)[0]
            tokens = token_mask(inputs)
            seen = len(calls)
            try:
                run_checked(model, task, inputs, who)
            except _StopForward:
                pass
            if len(calls) == seen:
                raise CompactMLError(
                    f"the calibration batch {describe(inputs)} never reached the model's first "
                    f"block; {who} needs batches that run through the model"
                )
    finally:
        handle.remove()
    return calls


def collect(
    block: Block, layers: dict[str, nn.Module], make: Callable[[nn.Module], Any]
) -> dict[str, Any]:
    """Run ``block`` on its calibration inputs while each of ``layers`` (name -> module) feeds
    its input to a new accumulator ``make(module)`` (see :mod:`compactml.calib.stats`);
    returns the accumulators by name (no forward pass when ``layers`` is empty). Padding
    positions of batches with an ``attention_mask`` are left out (:func:`real_tokens`)."""
    stats = {name: make(module) for name, module in layers.items()}

    def hook(name: str) -> Callable:
        def add(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            stats[name].add(real_tokens(x))

        return add

    if not layers:
        return stats
    handles = [
        module.register_forward_pre_hook(hook(name), with_kwargs=True)
        for name, module in layers.items()
    ]
    try:
        block.forward()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _forward_all(module: nn.Module, calls: list[Call]) -> None:
    for call in calls:
        call.run(module)


def run_blockwise(
    model: nn.Module,
    task: Task,
    step: Callable[[Block], None],
    batches: int | None = None,
    progress: bool = True,
    who: str = "calibration",
) -> dict[str, Any]:
    """Call ``step`` on each block of ``model`` in order, then on the model-level rest (see the
    module docstring); ``model`` (a copy the caller owns) is compressed in place by ``step``.

    ``batches`` limits the calibration batches (None: all); ``who`` names the method in errors.
    Returns ``{"blocks": [names], "calib_batches": n}``.
    """
    inputs = _first_inputs(task, who)
    with eval_mode(model), torch.no_grad():
        blocks = find_blocks(model)
        if blocks and not _runs_in_sequence(model, blocks, task, inputs, who):
            warnings.warn(
                f"{who}: the layers of {blocks[0][0].rpartition('.')[0]} do not run one after "
                "the other on each other's output with the same other arguments; calibrating "
                "the whole model at once",
                stacklevel=3,
            )
            blocks = []
        calls = capture_inputs(model, blocks[0][1], task, batches, who) if blocks else []
        seen = len(calls)
        label = f"{who} blocks"
        for name, module in progress_bar(blocks, label, total=len(blocks), enabled=progress):
            step(Block(name, module, functools.partial(_forward_all, module, calls)))
            for i, call in enumerate(calls):  # in place: each old input is freed as it goes
                calls[i] = call.with_hidden(call.run(module))
        calls.clear()

        def whole() -> None:
            nonlocal seen
            seen = 0
            for batch in task.batches("calib", limit=batches):
                inputs = split_batch(batch)[0]
                with padding_of(token_mask(inputs)):
                    run_checked(model, task, inputs, who)
                seen += 1

        step(Block("", model, whole, tuple(name for name, _ in blocks)))
    return {"blocks": [name for name, _ in blocks], "calib_batches": seen}
