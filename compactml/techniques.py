"""``TECHNIQUES``: the one literal table from recipe names to technique config classes.

``- weight_only: {bits: 4, group_size: 32}`` in a recipe is ``WeightOnly(bits=4, group_size=32)``;
the same names appear in the CLI and in reports. Unknown names and unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compactml.config import Technique
from compactml.errors import CompactMLError
from compactml.prune.calibrated import SparseGPT, Wanda
from compactml.prune.nm import NM
from compactml.prune.structured import Channels, Heads
from compactml.prune.unstructured import Magnitude, Taylor
from compactml.quantize.awq import AWQ
from compactml.quantize.dynamic import Dynamic
from compactml.quantize.gptq import GPTQ
from compactml.quantize.mixed import MixedPrecision
from compactml.quantize.ptq import Static
from compactml.quantize.qat import QAT
from compactml.quantize.smoothquant import SmoothQuant
from compactml.quantize.weight_only import Half, WeightOnly

TECHNIQUES: dict[str, type[Technique]] = {
    "weight_only": WeightOnly,
    "half": Half,
    "mixed_precision": MixedPrecision,
    "qat": QAT,
    "dynamic": Dynamic,
    "static": Static,
    "gptq": GPTQ,
    "awq": AWQ,
    "smoothquant": SmoothQuant,
    "magnitude": Magnitude,
    "taylor": Taylor,
    "nm": NM,
    "sparsegpt": SparseGPT,
    "wanda": Wanda,
    "channels": Channels,
    "heads": Heads,
}


def technique_from_dict(name: str, params: dict[str, Any] | None = None) -> Technique:
    """The config called ``name`` in ``TECHNIQUES``, built from ``params`` (a recipe's dict)."""
    cls = TECHNIQUES.get(name)
    if cls is None:
        raise CompactMLError(
            f"unknown technique {name!r}; use one of {', '.join(sorted(TECHNIQUES))}"
        )
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise CompactMLError(
            f"the parameters of {name} must be a mapping such as {{bits: 4}}, got "
            f"{type(params).__name__}"
        )
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise CompactMLError(
            f"unknown parameter(s) {', '.join(map(str, unknown))} for {name}; "
            f"valid ones are {', '.join(valid)}"
        )
    return cls(**params)


def technique_name(config: Technique) -> str:
    """The recipe name of ``config``'s class in ``TECHNIQUES``."""
    for name, cls in TECHNIQUES.items():
        if type(config) is cls:
            return name
    raise CompactMLError(
        f"{type(config).__name__} is not in TECHNIQUES; add it to compactml/techniques.py"
    )
