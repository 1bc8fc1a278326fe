"""Named pruning methods for the command line: ``compactml prune --method magnitude`` and friends.

Each name maps to a function building the config from the command-line options. The table is
literal: grep finds every method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compactml.config import Technique
from compactml.errors import CompactMLError
from compactml.prune.calibrated import SparseGPT, Wanda
from compactml.prune.nm import NM
from compactml.prune.schedule import Iterative, OneShot
from compactml.prune.structured import Channels, Heads
from compactml.prune.unstructured import Magnitude, Taylor

MethodFactory = Callable[[dict[str, Any]], Technique]


def _schedule(o: dict[str, Any]) -> OneShot | Iterative:
    if not o.get("steps"):
        return OneShot()
    return Iterative(steps=o["steps"], epochs=o.get("epochs") or 1, lr=o.get("lr") or 1e-3)


def _common(o: dict[str, Any]) -> dict[str, Any]:
    return {"exclude": tuple(o.get("exclude") or ())}


def _sparsity(o: dict[str, Any]) -> float:
    if o.get("sparsity") is None:
        raise CompactMLError("this method needs --sparsity, e.g. --sparsity 0.5")
    return o["sparsity"]


def _pattern(o: dict[str, Any]) -> dict[str, Any]:
    """``--sparsity`` or ``--n``/``--m`` for the calibrated methods; the config refuses both."""
    if o.get("sparsity") is None and o.get("n") is None and o.get("m") is None:
        raise CompactMLError(
            "this method needs --sparsity (e.g. --sparsity 0.5) or --n and --m (e.g. --n 2 --m 4)"
        )
    return {"sparsity": o.get("sparsity"), "n": o.get("n"), "m": o.get("m")}


def _ratio(o: dict[str, Any]) -> float:
    if o.get("ratio") is None:
        raise CompactMLError("this method needs --ratio, e.g. --ratio 0.5")
    return o["ratio"]


METHODS: dict[str, tuple[MethodFactory, str]] = {
    "magnitude": (
        lambda o: Magnitude(
            sparsity=_sparsity(o),
            scope=o.get("scope") or "layer",
            schedule=_schedule(o),
            **_common(o),
        ),
        "zero the smallest weights (--sparsity, --scope layer|global; --steps N: iterative "
        "with fine-tuning)",
    ),
    "taylor": (
        lambda o: Taylor(
            sparsity=_sparsity(o),
            scope=o.get("scope") or "layer",
            schedule=_schedule(o),
            **_common(o),
        ),
        "zero the weights of smallest |w * gradient| on task.train (--sparsity)",
    ),
    "nm": (
        lambda o: NM(n=o.get("n") or 2, m=o.get("m") or 4, **_common(o)),
        "keep N of every M weights along the input dimension (--n 2 --m 4)",
    ),
    "sparsegpt": (
        lambda o: SparseGPT(**_pattern(o), **_common(o)),
        "prune Linear layers and update the kept weights from calibration data (SparseGPT; "
        "--sparsity, or --n 2 --m 4)",
    ),
    "wanda": (
        lambda o: Wanda(**_pattern(o), **_common(o)),
        "prune the Linear weights of smallest |w| * input norm on calibration data (Wanda; "
        "--sparsity, or --n 2 --m 4)",
    ),
    "channels": (
        lambda o: Channels(ratio=_ratio(o), importance=o.get("importance") or "l1", **_common(o)),
        "remove channels and neurons for real: a smaller dense model (--ratio, --importance)",
    ),
    "heads": (
        lambda o: Heads(ratio=_ratio(o), importance=o.get("importance") or "l1", **_common(o)),
        "remove whole attention heads (--ratio)",
    ),
}


def method_config(name: str, **options: Any) -> Technique:
    """The config for method ``name`` built from command-line ``options``."""
    if name not in METHODS:
        raise CompactMLError(f"unknown method {name!r}; use one of: {', '.join(METHODS)}")
    return METHODS[name][0](options)
