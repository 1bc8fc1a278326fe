"""Named techniques for ``compactml sensitivity --method``: what each one varies per level.

Each name maps to a function ``(level, options) -> Technique`` and the name of the level it
varies. The pruning methods are built by :func:`compactml.prune.methods.method_config`, with
the level as the sparsity (``magnitude``, ``taylor``), the ratio (``channels``, ``heads``) or
N of N:M with M fixed (``nm``); ``int-weight`` is ``WeightOnly(bits=level)``. The table is
literal: grep finds every method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from compactml.config import Technique
from compactml.errors import CompactMLError
from compactml.prune.methods import method_config
from compactml.quantize.weight_only import WeightOnly

LevelFactory = Callable[[Any, dict[str, Any]], Technique]


def _pruning(method: str, field: str) -> LevelFactory:
    """A factory passing the level to pruning method ``method`` as its ``field``."""

    def make(level: Any, o: dict[str, Any]) -> Technique:
        keep = ("scope", "importance", "exclude")
        return method_config(method, **{field: level}, **{k: o.get(k) for k in keep})

    return make


SENSITIVITY_METHODS: dict[str, tuple[LevelFactory, str, str]] = {
    "magnitude": (_pruning("magnitude", "sparsity"), "sparsity", "share of weights zeroed"),
    "taylor": (_pruning("taylor", "sparsity"), "sparsity", "share of weights zeroed (Taylor)"),
    "nm": (
        lambda level, o: method_config("nm", n=level, m=o.get("m") or 4, exclude=o.get("exclude")),
        "n",
        "N weights kept in every M (--m, default 4)",
    ),
    "channels": (_pruning("channels", "ratio"), "ratio", "share of channels removed"),
    "heads": (_pruning("heads", "ratio"), "ratio", "share of attention heads removed"),
    "int-weight": (
        lambda level, o: WeightOnly(
            bits=level, group_size=o.get("group_size"), exclude=tuple(o.get("exclude") or ())
        ),
        "bits",
        "bits per weight, per output channel or --group-size",
    ),
}

LEVELS_EXAMPLE = "--levels 0.3,0.5,0.7 (sparsity or ratio), 8,4,2 (bits) or 1,2,3 (N of N:M)"


def parse_levels(text: str | None) -> tuple[int | float, ...]:
    """The comma-separated levels of ``--levels``: whole numbers as int (bits, N), others as
    float (sparsity, ratio)."""
    if text is None or not text.strip():
        raise CompactMLError(f"the method needs levels to try; pass {LEVELS_EXAMPLE}")
    levels: list[int | float] = []
    for token in (part.strip() for part in text.split(",")):
        try:
            value: int | float = int(token)
        except ValueError:
            try:
                value = float(token)
            except ValueError:
                value = math.nan
        if not math.isfinite(value):
            raise CompactMLError(
                f"--levels {text!r}: {token!r} is not a number; pass {LEVELS_EXAMPLE}"
            )
        levels.append(value)
    if len(set(levels)) != len(levels):
        raise CompactMLError(f"--levels {text!r} repeats a level; give each level once")
    return tuple(levels)


def method_levels(
    name: str, levels: tuple[Any, ...], **options: Any
) -> tuple[Callable[[Any], Technique], str]:
    """A function level -> the technique of method ``name`` at that level, and the level's
    name (``"sparsity"``, ``"ratio"``, ``"n"``, ``"bits"``).

    ``options`` may hold ``scope``, ``importance``, ``m``, ``group_size`` and ``exclude``.
    Every level is tried here, so a level the method refuses fails before any model is loaded.
    """
    if name not in SENSITIVITY_METHODS:
        known = ", ".join(SENSITIVITY_METHODS)
        raise CompactMLError(f"unknown method {name!r}; use one of: {known}")
    factory, level_name, _ = SENSITIVITY_METHODS[name]

    def make(level: Any) -> Technique:
        return factory(level, options)

    for level in levels:
        try:
            make(level)
        except CompactMLError as exc:
            raise CompactMLError(f"{name} at {level_name} {level}: {exc}") from exc
    return make, level_name
