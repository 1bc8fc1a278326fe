"""ONNX form of :class:`~compactml.quantize.dynamic.DynamicQuantLinear` (dynamic INT8).

The layer becomes integer arithmetic that ONNX Runtime runs on its U8S8 kernels (uint8
activations times int8 weights, AVX-512 VNNI on x86). The input is viewed as tokens
``[1, M, K]`` (``M`` = every leading axis together) and, per token::

    amax   = Max(GlobalMaxPool(Abs(x)), AMAX_FLOOR)             [1, M, 1]
    codes  = QuantizeLinear(x * (127 / amax), 1.0, 128)          uint8 (round half to even)
    acc    = MatMulInteger(codes, W_int8, 128)                   int32, W stored K x N
    y      = Cast(acc) * ((amax / 127) * scale_w) + bias         reshaped to x's leading axes

These are the float32 operations the PyTorch layer performs, in the same order, so both
produce the same codes. Every op keeps its signature from opset 17 on (``ReduceMax`` does not:
its ``axes`` became an input at opset 18, so ``GlobalMaxPool`` over the ``[1, M, K]`` view
takes the per-token maxima). A per-tensor ``QuantizeLinear`` after the multiplication was
faster in ONNX Runtime than a per-axis one (which needs a zero point per token) or than
``Div``/``Round``/``Add``/``Clip``/``Cast``.

ONNX Runtime (level 2 optimizations) fuses ``MatMulInteger -> Cast -> Mul(Mul(a_scale,
b_scale))`` into its contrib ``MatMulIntegerToFloat``, which accepts per-token ``a_scale``
``[1, M, 1]`` and per-channel ``b_scale`` (the ``[1, M, K]`` view is needed: with a
``[B, T, K]`` input left as it is, ``a_scale`` ``[B, T, 1]``, ONNX Runtime 1.32's fused kernel
was 2% off for ``B > 1``); the bias ``Add`` comes after the ``Reshape`` so that
fusion never takes it in as its own bias input (it would then be multiplied by the per-token
scale). ``DynamicQuantizeMatMul`` quantizes activations per tensor: it is what the layers
with ``activation="tensor"`` (``Dynamic(per_tensor=...)``) become, bias included.

Tolerance: ONNX Runtime sums the integer products exactly and scales once; PyTorch multiplies
the dequantized values in float32. One layer agrees within :data:`ORT_TOLERANCE` (relative to
its largest output), checked by the tests. Through a deep model, float-level differences
upstream (e.g. a fused attention) can move a token's value across a rounding boundary, so
whole models are compared by cosine fidelity instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto, helper

from compactml.quantize.dynamic import ACT_QMAX, ACT_ZERO_POINT, AMAX_FLOOR, DynamicQuantLinear

if TYPE_CHECKING:  # onnx_lowering imports this module for its LOWERINGS table
    from compactml.export.onnx_lowering import Lowered

#: Max |ORT - PyTorch| / max |PyTorch output| for one layer (float32 summation order).
ORT_TOLERANCE = 1e-5


def _np_scalar(value: float | int, dtype: type) -> np.ndarray:
    return np.array(value, dtype)


def _quantize_tokens(out: Lowered, x3: str, prefix: str) -> tuple[str, str]:
    """uint8 codes and per-token scales ``[1, M, 1]`` of the ``[1, M, K]`` view ``x3``."""
    a = out.node("Abs", [x3], f"{prefix}.act.abs")
    amax = out.node("GlobalMaxPool", [a], f"{prefix}.act.amax")
    floor = out.const(f"{prefix}.act.floor", _np_scalar(AMAX_FLOOR, np.float32))
    safe = out.node("Max", [amax, floor], f"{prefix}.act.amax_safe")
    qmax = out.const(f"{prefix}.act.qmax", _np_scalar(float(ACT_QMAX), np.float32))
    inv = out.node("Div", [qmax, safe], f"{prefix}.act.inv_scale")
    scale = out.node("Div", [safe, qmax], f"{prefix}.act.scale")
    t = out.node("Mul", [x3, inv], f"{prefix}.act.scaled")
    one = out.const(f"{prefix}.act.unit", _np_scalar(1.0, np.float32))
    zp = out.const(f"{prefix}.act.zero_point", _np_scalar(ACT_ZERO_POINT, np.uint8))
    return out.node("QuantizeLinear", [t, one, zp], f"{prefix}.act.codes"), scale


def _integer_matmul(
    out: Lowered, layer: DynamicQuantLinear, codes: str, zero: str, scale: str, prefix: str, h: str
) -> str:
    """``h = Cast(MatMulInteger(codes, W, zero)) * (scale * scale_w)``: the pattern ONNX Runtime
    fuses (into ``MatMulIntegerToFloat``, or ``DynamicQuantizeMatMul`` after a
    ``DynamicQuantizeLinear``); returns ``h``."""
    q = layer.qweight_data()
    weight = (q.codes().numpy().astype(np.int16) - q.scheme.mid).astype(np.int8).T  # K x N
    w = out.const(f"{prefix}.weight.codes", np.ascontiguousarray(weight))
    acc = out.node("MatMulInteger", [codes, w, zero], f"{prefix}.matmul_int")
    f = out.node("Cast", [acc], f"{prefix}.acc_f", to=TensorProto.FLOAT)
    ws = out.const(f"{prefix}.weight.scale", q.scale.float().numpy())
    both = out.node("Mul", [scale, ws], f"{prefix}.scales")
    return out.node("Mul", [f, both], h)


def _before_bias(layer: DynamicQuantLinear, y: str, prefix: str) -> str:
    """The name of the value the bias is added to: ``y`` itself when there is no bias."""
    return y if layer.bias is None else f"{prefix}.h_shaped"


def _add_bias(out: Lowered, layer: DynamicQuantLinear, y: str, prefix: str) -> Lowered:
    """``y = h + bias`` when the layer has a bias; returns ``out``."""
    if layer.bias is not None:
        b = out.const(f"{prefix}.bias", layer.bias.detach().float().numpy())
        out.node("Add", [_before_bias(layer, y, prefix), b], y)
    return out


def lower_dynamic_quant_linear(layer: DynamicQuantLinear, x: str, y: str, prefix: str) -> Lowered:
    """``DynamicQuantLinear`` as uint8 quantization + ``MatMulInteger`` + scaling (see the
    module docstring). With ``activation="tensor"``: ``DynamicQuantizeLinear`` on ``x`` as it
    is, which ONNX Runtime fuses with the rest, bias included (a per-tensor scale allows it),
    into one ``DynamicQuantizeMatMul``."""
    from compactml.export.onnx_lowering import Lowered

    out = Lowered()
    h = _before_bias(layer, y, prefix)
    if layer.activation == "tensor":
        codes, scale, zero = (f"{prefix}.act.{part}" for part in ("codes", "scale", "zero_point"))
        out.nodes.append(
            helper.make_node("DynamicQuantizeLinear", [x], [codes, scale, zero], name=codes)
        )
        _integer_matmul(out, layer, codes, zero, scale, prefix, h)
        return _add_bias(out, layer, y, prefix)
    k, n = layer.in_features, layer.out_features
    view = out.const(f"{prefix}.tokens_shape", np.array([1, -1, k], np.int64))
    x3 = out.node("Reshape", [x, view], f"{prefix}.tokens")
    codes, scale = _quantize_tokens(out, x3, prefix)
    zp = out.const(f"{prefix}.act.mm_zero_point", _np_scalar(ACT_ZERO_POINT, np.uint8))
    flat = _integer_matmul(out, layer, codes, zp, scale, prefix, f"{prefix}.h")
    lead = out.node("Shape", [x], f"{prefix}.lead_shape", end=-1)
    last = out.const(f"{prefix}.out_features", np.array([n], np.int64))
    shape = out.node("Concat", [lead, last], f"{prefix}.out_shape", axis=0)
    out.node("Reshape", [flat, shape], h)
    return _add_bias(out, layer, y, prefix)
