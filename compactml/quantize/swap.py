"""Putting quantized layers into a model, shared by the quantization configs.

:func:`set_layer` replaces one module by name (the model itself when the name is ``""``).
:func:`build_layers` builds the replacement of each chosen layer and keeps the layers whose
build raises a CompactMLError in float, with the reason; :func:`warn_skipped` names them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

from torch import nn

from compactml.config import HISTORY_ATTR, Technique, history, replace_module
from compactml.errors import CompactMLError
from compactml.source import get_source, set_source


def set_layer(model: nn.Module, name: str, layer: nn.Module) -> nn.Module:
    """Put ``layer`` at the dotted ``name`` in ``model`` (changed in place) and return the model;
    for ``name == ""`` (the model is a single layer) return ``layer`` itself, carrying the
    model's recorded source and history."""
    if name:
        replace_module(model, name, layer)
        return model
    if get_source(model):
        layer = set_source(layer, get_source(model))
    if history(model):
        object.__setattr__(layer, HISTORY_ATTR, history(model))
    return layer


def build_layers(
    chosen: Iterable[tuple[str, nn.Module]], build: Callable[[nn.Module], nn.Module]
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """``({name: build(module)}, {name: reason})``: the layers built, and those whose build
    raised a CompactMLError (they stay in float; the reason is the error's message)."""
    built: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in chosen:
        try:
            built[name] = build(module)
        except CompactMLError as exc:
            skipped[name] = str(exc)
    return built, skipped


def check_some_built(built: dict[str, nn.Module], skipped: dict[str, str]) -> None:
    """Raise when no layer was built (nothing would change), naming the first failure."""
    if not built and skipped:
        name, reason = next(iter(skipped.items()))
        raise CompactMLError(f"no selected layer can be quantized; {name or 'model'}: {reason}")


def warn_skipped(technique: Technique, skipped: dict[str, str], stacklevel: int = 3) -> None:
    """Warn that the ``skipped`` layers (name -> reason) stay in float, naming each."""
    if skipped:
        listed = "; ".join(f"{name or 'model'}: {reason}" for name, reason in skipped.items())
        warnings.warn(
            f"{type(technique).__name__} kept {len(skipped)} layer(s) in float: {listed}",
            stacklevel=stacklevel + 1,
        )
