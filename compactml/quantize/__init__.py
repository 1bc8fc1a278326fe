"""``quantize(model, config, task=None)``: the quantization family's verb, and its configs.

The verb is thin: it checks that ``config`` is a quantization technique and calls
``config.apply(model, task)``. The math lives in ``affine.py`` (and ``clip.py``; activations in
``act.py``; quantization-aware training in ``qat.py``), compressed
weights are plain ``QWeight`` data (``qweight.py``), and the layers that hold them are in
``modules.py``.
"""

from __future__ import annotations

from torch import nn

from compactml.config import Technique
from compactml.errors import CompactMLError
from compactml.quantize.act import ActQuant
from compactml.quantize.affine import FloatScheme, PerChannel, PerGroup, PerTensor, QScheme
from compactml.quantize.awq import AWQ, awq_search
from compactml.quantize.dynamic import Dynamic, DynamicQuantLinear
from compactml.quantize.gptq import GPTQ, gptq_quantize
from compactml.quantize.mixed import MixedPrecision
from compactml.quantize.modules import QuantConv2d, QuantEmbedding, QuantLinear, QuantOutput
from compactml.quantize.ptq import Static
from compactml.quantize.qat import QAT, fold_batchnorm
from compactml.quantize.qweight import QWeight
from compactml.quantize.smoothquant import SmoothQuant, smooth_scales
from compactml.quantize.weight_only import Half, WeightOnly
from compactml.task import Task

__all__ = [
    "AWQ",
    "QAT",
    "ActQuant",
    "Dynamic",
    "DynamicQuantLinear",
    "FloatScheme",
    "GPTQ",
    "Half",
    "MixedPrecision",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "QScheme",
    "QWeight",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantOutput",
    "SmoothQuant",
    "Static",
    "WeightOnly",
    "awq_search",
    "fold_batchnorm",
    "gptq_quantize",
    "quantize",
    "smooth_scales",
]


def quantize(model: nn.Module, config: Technique, task: Task | None = None) -> nn.Module:
    """A quantized copy of ``model`` made by ``config`` (e.g. ``WeightOnly(bits=4)``).

    ``task`` supplies calibration or training data to the configs that need it. ``model`` is
    never modified.
    """
    if not isinstance(config, Technique) or config.family != "quantize":
        family = getattr(config, "family", None)
        what = f"a {family} technique" if family else f"a {type(config).__name__}"
        raise CompactMLError(
            f"quantize() got {what}; pass a quantization config such as WeightOnly(bits=4) "
            "or Half(), or call the verb of that technique's family"
        )
    return config.apply(model, task)
