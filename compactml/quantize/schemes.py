"""Named quantization schemes for the command line: ``--scheme int4-weight`` and friends.

The GPTQ schemes use ``act_order``: it visits columns by input energy but keeps the stored
groups in column order, so it costs nothing at run time, and it lowered the error on both
built-in language models (``benchmarks/calibrated.py``: minilm 4-bit g64 1 - cosine 0.0159 vs
0.0186; tiny-llama 3-bit g64 perplexity increase 0.14 vs 0.22).

Each name maps to a function building the config, so options such as the group size or the
layers to leave alone can be passed through. The table is literal: grep finds every scheme.
"""

from __future__ import annotations

from collections.abc import Callable

from compactml.config import Technique
from compactml.errors import CompactMLError
from compactml.quantize.awq import AWQ
from compactml.quantize.dynamic import Dynamic
from compactml.quantize.gptq import GPTQ
from compactml.quantize.ptq import Static
from compactml.quantize.qat import QAT
from compactml.quantize.smoothquant import SmoothQuant
from compactml.quantize.weight_only import Half, WeightOnly

SchemeFactory = Callable[[dict], Technique]

SCHEMES: dict[str, tuple[SchemeFactory, str]] = {
    "int8-static": (
        lambda o: Static(bits=8, observer="percentile", **_common(o)),
        "8-bit weights and activations, calibrated on task.calib (QLinearConv in ONNX Runtime)",
    ),
    "int8-smoothquant": (
        lambda o: SmoothQuant(alpha=0.5, observer="percentile", **_common(o)),
        "int8-static after SmoothQuant moves activation outliers of Linear inputs into the "
        "weights (alpha 0.5; on minilm 0.24x the output error of int8-static)",
    ),
    "int8-dynamic": (
        lambda o: Dynamic(bits=8, **_common(o)),
        "8-bit weights, activations quantized per token at run time (linear layers)",
    ),
    "int8-dynamic-auto": (
        lambda o: Dynamic(bits=8, per_tensor="auto", **_common(o)),
        "int8-dynamic, with one activation scale per tensor instead of per token (fused and "
        "faster in ONNX Runtime) for the layers chosen on task.calib, within 10% more output "
        "error",
    ),
    "int8-weight": (
        lambda o: WeightOnly(bits=8, group_size=o.get("group_size"), **_common(o)),
        "8-bit weights, per output channel (or --group-size); activations stay float",
    ),
    "int4-weight": (
        lambda o: WeightOnly(
            bits=4,
            group_size=o.get("group_size") or 32,
            symmetric=False,
            clip="mse",
            **_common(o),
        ),
        "4-bit weights in groups of 32, asymmetric, with MSE clipping (MatMulNBits in ONNX "
        "Runtime; on minilm 0.975 cosine fidelity against 0.963 symmetric)",
    ),
    "int2-weight": (
        lambda o: WeightOnly(
            bits=2,
            group_size=o.get("group_size") or 16,
            symmetric=False,
            clip="mse",
            **_common(o),
        ),
        "2-bit weights in groups of 16, asymmetric, with MSE clipping",
    ),
    "int4-gptq": (
        lambda o: GPTQ(bits=4, group_size=o.get("group_size") or 64, act_order=True, **_common(o)),
        "4-bit weights in groups of 64 chosen by GPTQ (act_order) on task.calib, block by block "
        "(Linear layers; MatMulNBits in ONNX Runtime)",
    ),
    "int3-gptq": (
        lambda o: GPTQ(bits=3, group_size=o.get("group_size") or 64, act_order=True, **_common(o)),
        "3-bit weights in groups of 64 chosen by GPTQ (act_order) on task.calib (Linear layers)",
    ),
    "int4-awq": (
        lambda o: AWQ(bits=4, group_size=o.get("group_size") or 64, **_common(o)),
        "4-bit weights in groups of 64 after AWQ's activation-aware scaling on task.calib "
        "(Linear layers; MatMulNBits in ONNX Runtime)",
    ),
    "fp16": (lambda o: Half(dtype="float16", **_common(o)), "float16 weights"),
    "bf16": (lambda o: Half(dtype="bfloat16", **_common(o)), "bfloat16 weights"),
    "qat-w4a8": (
        lambda o: QAT(weight_bits=4, act_bits=8, group_size=o.get("group_size"), **_common(o)),
        "quantization-aware training: 4-bit weights, 8-bit activations (needs task.train)",
    ),
}


def _common(options: dict) -> dict:
    return {"exclude": tuple(options.get("exclude") or ())}


def scheme_config(name: str, **options) -> Technique:
    """The config for scheme ``name``; ``options`` may hold ``group_size`` and ``exclude``."""
    if name not in SCHEMES:
        known = ", ".join(SCHEMES)
        raise CompactMLError(f"unknown scheme {name!r}; use one of: {known}")
    return SCHEMES[name][0](options)
