"""ONNX lowerings for statically quantized models (``Static``): the QDQ form ONNX Runtime fuses.

ONNX Runtime turns ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv``, two
``DequantizeLinear`` into ``Add -> QuantizeLinear`` into ``QLinearAdd``, drops a ``Relu`` right
before a ``QuantizeLinear`` with zero point 0, and runs ``MaxPool`` on uint8 between a
``DequantizeLinear`` and a ``QuantizeLinear`` of the same scale. To get that form:

- a layer's ``output_quant`` becomes ``QuantizeLinear``/``DequantizeLinear`` (uint8) after it;
- when a layer's input is quantized to 8 bits, its bias is stored as int32 codes with scale
  ``input_scale * weight_scale`` (per output channel) and a ``DequantizeLinear``, as ORT's
  fused kernels require (the bias then differs from the float bias by at most half that step);
- :class:`~compactml.quantize.modules.QuantOutput` becomes its inner op (``Relu``, ``Clip``,
  ``MaxPool``) followed by ``QuantizeLinear``/``DequantizeLinear``.

Weights are int8 per-channel ``DequantizeLinear`` (the base lowerings of
:mod:`compactml.export.onnx_lowering`, which this module extends; imported lazily because that
module imports this one for its ``LOWERINGS`` table).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import numpy_helper
from torch import nn

from compactml.errors import CompactMLError
from compactml.quantize.act import ActQuant
from compactml.quantize.modules import QuantConv2d, QuantLinear, QuantOutput

INT32_MAX = 2**31 - 1


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


def _scalar(out: Any, name: str, value: np.ndarray) -> str:
    """A rank-0 initializer (``Lowered.const`` goes through ``np.ascontiguousarray``, which
    makes it rank 1; ORT fuses ``QLinearAdd`` only with scalar scales and zero points)."""
    out.initializers.append(numpy_helper.from_array(value.reshape(()), name))
    return name


def quant_qdq(quant: ActQuant, out: Any, x: str, y: str, name: str) -> str:
    """``QuantizeLinear`` + ``DequantizeLinear`` of ``x`` (output ``y``) with ``quant``'s
    8-bit scale and zero point; ``out`` is a ``Lowered``."""
    if quant.bits != 8:
        raise CompactMLError(
            f"{name}: only 8-bit activation quantizers export as QuantizeLinear, got "
            f"{quant.bits} bits; use 8-bit activations"
        )
    zdtype = np.int8 if quant.signed else np.uint8
    s = _scalar(out, f"{name}.scale", np.array(_np(quant.scale).reshape(()), np.float32))
    z = _scalar(out, f"{name}.zero_point", np.array(int(quant.zero_point), zdtype))
    q = out.node("QuantizeLinear", [x, s, z], f"{name}.q")
    return out.node("DequantizeLinear", [q, s, z], y)


def _int32_bias(layer: nn.Module, out: Any, prefix: str) -> None:
    """Replace the float bias initializer ``<prefix>.bias`` by int32 codes and a
    ``DequantizeLinear`` (scale ``input_scale * weight_scale``), in place."""
    name = f"{prefix}.bias"
    found = [i for i, t in enumerate(out.initializers) if t.name == name]
    quant = layer.input_quant
    if not found or quant is None or quant.bits != 8 or layer.qweight_data().scale is None:
        return
    del out.initializers[found[0]]
    w_scale = _np(layer.qweight_data().scale.float()).reshape(-1).astype(np.float64)
    bias = _np(layer.bias.float()).astype(np.float64)
    scale = (float(_np(quant.scale)) * np.broadcast_to(w_scale, bias.shape)).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    codes = np.clip(np.round(bias / safe), -INT32_MAX, INT32_MAX).astype(np.int32)
    inputs = [
        out.const(f"{name}.int32", codes),
        out.const(f"{name}.scale", np.where(scale > 0, scale, 1.0).astype(np.float32)),
        out.const(f"{name}.zero_point", np.zeros(bias.shape, np.int32)),
    ]
    out.node("DequantizeLinear", inputs, name, axis=0)
    out.nodes.insert(0, out.nodes.pop())  # before the node that reads it


def _static(base: Any, layer: nn.Module, x: str, y: str, prefix: str) -> Any:
    """``base``'s lowering of ``layer`` with an int32 bias (quantized input) and the
    ``output_quant`` Q/DQ after it."""
    quant = getattr(layer, "output_quant", None)
    out = base(layer, x, y if quant is None else f"{prefix}.float_output", prefix)
    _int32_bias(layer, out, prefix)
    if quant is not None:
        quant_qdq(quant, out, f"{prefix}.float_output", y, f"{prefix}.output")
    return out


def lower_static_linear(layer: QuantLinear, x: str, y: str, prefix: str) -> Any:
    """``QuantLinear`` as in ``onnx_lowering.lower_quant_linear``, plus its output quantizer and
    an int32 bias when its input is quantized."""
    from compactml.export import onnx_lowering

    if layer.input_quant is None and layer.output_quant is None:
        return onnx_lowering.lower_quant_linear(layer, x, y, prefix)
    return _static(onnx_lowering.lower_quant_linear, layer, x, y, prefix)


def lower_static_conv2d(layer: QuantConv2d, x: str, y: str, prefix: str) -> Any:
    """``QuantConv2d`` as in ``onnx_lowering.lower_quant_conv2d``, plus its output quantizer and
    an int32 bias when its input is quantized."""
    from compactml.export import onnx_lowering

    if layer.input_quant is None and layer.output_quant is None:
        return onnx_lowering.lower_quant_conv2d(layer, x, y, prefix)
    return _static(onnx_lowering.lower_quant_conv2d, layer, x, y, prefix)


def _pool_attrs(pool: nn.Module, dims: int) -> dict[str, Any]:
    def tup(v: Any) -> list[int]:
        return [int(i) for i in v] if isinstance(v, tuple | list) else [int(v)] * dims

    if getattr(pool, "return_indices", False):
        raise CompactMLError("a max pool returning indices cannot be exported; use indices=False")
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return {
        "kernel_shape": tup(pool.kernel_size),
        "strides": tup(stride),
        "pads": tup(pool.padding) * 2,
        "dilations": tup(getattr(pool, "dilation", 1)),
        "ceil_mode": int(pool.ceil_mode),
    }


def _inner(inner: nn.Module, out: Any, x: str, y: str, prefix: str) -> str:
    """The ONNX node(s) of ``QuantOutput``'s inner module."""
    if type(inner) is nn.ReLU:
        return out.node("Relu", [x], y)
    if type(inner) is nn.ReLU6:
        lo = out.const(f"{prefix}.min", np.array(0.0, np.float32))
        hi = out.const(f"{prefix}.max", np.array(6.0, np.float32))
        return out.node("Clip", [x, lo, hi], y)
    if type(inner) in (nn.MaxPool1d, nn.MaxPool2d):
        dims = 1 if type(inner) is nn.MaxPool1d else 2
        return out.node("MaxPool", [x], y, **_pool_attrs(inner, dims))
    if type(inner) is nn.AdaptiveAvgPool2d and inner.output_size in (1, (1, 1)):
        return out.node("GlobalAveragePool", [x], y)
    if type(inner) is nn.AvgPool2d and inner.divisor_override is None:
        attrs = _pool_attrs(inner, 2) | {"count_include_pad": int(inner.count_include_pad)}
        attrs.pop("dilations")
        return out.node("AveragePool", [x], y, **attrs)
    if type(inner) in (nn.Identity, nn.Dropout):
        return out.node("Identity", [x], y)
    raise CompactMLError(
        f"cannot export QuantOutput around {type(inner).__name__}; only ReLU, ReLU6, MaxPool, "
        "Identity and Dropout are lowered"
    )


def lower_quant_output(layer: QuantOutput, x: str, y: str, prefix: str) -> Any:
    """``QuantOutput``: the inner op, then ``QuantizeLinear``/``DequantizeLinear``."""
    from compactml.export.onnx_lowering import Lowered

    out = Lowered()
    h = _inner(layer.inner, out, x, f"{prefix}.inner", prefix)
    quant_qdq(layer.quant, out, h, y, f"{prefix}.output")
    return out
