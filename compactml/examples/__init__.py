"""Built-in real models with their Tasks: ``cml.examples.load("digits-cnn")``.

Each built-in is one module with ``NAME``, ``build()`` (the architecture only, cheap),
``load()`` (trained weights + Task) and ``task()`` (the Task alone). ``BUILTINS`` is the one
table of names; nothing registers itself.

- ``digits-cnn``: a 15k-parameter CNN on scikit-learn's 8x8 digits (trained once, cached).
- ``minilm``: all-MiniLM-L6-v2 sentence embeddings on a stdlib-docstring retrieval task
  (needs the ``hf`` extra).
- ``tiny-llama``: a 5M-parameter Llama causal LM trained on the Python stdlib's source, scored
  by perplexity on held-out modules (trained once in a few minutes, cached; needs ``hf``).
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from compactml.errors import CompactMLError
from compactml.examples import digits_cnn, minilm, tiny_llama
from compactml.task import Task

BUILTINS: dict[str, ModuleType] = {
    "digits-cnn": digits_cnn,
    "minilm": minilm,
    "tiny-llama": tiny_llama,
}


def _module(name: str) -> ModuleType:
    if name not in BUILTINS:
        known = ", ".join(sorted(BUILTINS))
        raise CompactMLError(f"unknown built-in model {name!r}; choose one of: {known}")
    return BUILTINS[name]


def load(name: str, progress: bool = True) -> tuple[nn.Module, Task]:
    """The built-in model ``name`` (trained, eval mode) and its Task.

    ``progress=False`` silences the progress bars of first-time training or loading.
    """
    return _module(name).load(progress=progress)


def build(name: str) -> nn.Module:
    """The architecture of built-in ``name`` with untrained weights (cheap; never trains).

    Used to rebuild the module tree before loading an artifact's weights into it.
    """
    return _module(name).build()


def load_task(name: str) -> Task:
    """The Task of built-in ``name`` alone, e.g. for a model read back from a .cml file."""
    return _module(name).task()


__all__ = ["BUILTINS", "build", "load", "load_task"]
