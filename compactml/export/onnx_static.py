"""ONNX lowerings for statically quantized models (``Static``): the QDQ form ONNX Runtime fuses.

ONNX Runtime turns ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv``, two
``DequantizeLinear`` into ``Add -> QuantizeLinear`` into ``QLinearAdd``, drops a ``Relu`` right
before a ``QuantizeLinear`` with zero point 0, and runs ``MaxPool`` on uint8 between a
``DequantizeLinear`` and a ``QuantizeLinear`` of the same scale. To get that form:

- a layer's ``output_quant`` becomes ``QuantizeLinear``/``DequantizeLinear`` (uint8) after it;
- when a layer's input is quantized to 8 bits and its weight scale is per tensor or per output
  channel, its bias is stored as int32 codes with scale ``input_scale * weight_scale`` (per
  output channel) and a ``DequantizeLinear``, as ORT's fused kernels require (the bias then
  differs from the float bias by at most half that step). A per-group weight (MatMulNBits,
  or one scale per group of inputs) keeps its float bias, added to the float output as
  PyTorch does. A channel whose bias code would not fit in int32 (all-zero weights get a tiny
  weight scale) gets a larger weight scale in the ONNX file, as ORT's own quantizer does:
  its weights are all 0, so the output is unchanged. Keeping that bias float does not work:
  ORT quantizes a float bias of a QDQ Conv/Gemm to int32 itself, and overflows the same way;
- :class:`~compactml.quantize.modules.QuantOutput` becomes its inner op (``Relu``, ``Clip``,
  ``MaxPool``) followed by ``QuantizeLinear``/``DequantizeLinear``.

After lowering, :func:`drop_identity_activations` removes a ``Relu``/``Clip`` that follows a
uint8 ``DequantizeLinear`` with zero point 0 (a functional ``torch.relu`` after a layer whose
``output_quant`` already covers the ReLU's range, see :mod:`compactml.quantize.ptq`): ORT keeps
such a Relu float, and with it the ``Concat`` it feeds.

Weights are int8 per-channel ``DequantizeLinear`` (the base lowerings of
:mod:`compactml.export.onnx_lowering`, which this module extends; imported lazily because that
module imports this one for its ``LOWERINGS`` table).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.quantize.act import ActQuant
from compactml.quantize.affine import PerChannel, PerTensor, QScheme
from compactml.quantize.modules import QuantConv2d, QuantLinear, QuantOutput

INT32_MAX = 2**31 - 1


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` detached, on the CPU, as a NumPy array (same dtype and shape, 0-d kept 0-d)."""
    return t.detach().cpu().numpy()


def quant_qdq(quant: ActQuant, out: Any, x: str, y: str, name: str) -> str:
    """``QuantizeLinear`` + ``DequantizeLinear`` of ``x`` (output ``y``) with ``quant``'s
    8-bit scale and zero point; ``out`` is a ``Lowered``."""
    if quant.bits != 8:
        raise CompactMLError(
            f"{name}: only 8-bit activation quantizers export as QuantizeLinear, got "
            f"{quant.bits} bits; use 8-bit activations"
        )
    zdtype = np.int8 if quant.signed else np.uint8
    # 0-d scale and zero point: ORT fuses QLinearAdd only with scalar ones (Lowered.const keeps
    # 0-d arrays 0-d).
    s = out.const(f"{name}.scale", np.array(float(quant.scale), np.float32))
    z = out.const(f"{name}.zero_point", np.array(int(quant.zero_point), zdtype))
    q = out.node("QuantizeLinear", [x, s, z], f"{name}.q")
    return out.node("DequantizeLinear", [q, s, z], y)


def _per_output_channel(layer: nn.Module) -> np.ndarray | None:
    """The weight scale per output channel (float64), or None when the bias must stay float:
    no 8-bit ``input_quant``, no integer weight scale, or a weight scale that is not per tensor
    or per output channel (per group, per input column)."""
    quant, q = layer.input_quant, layer.qweight_data()
    if quant is None or quant.bits != 8 or not isinstance(q.scheme, QScheme) or q.scale is None:
        return None
    gran = q.scheme.granularity
    per_channel = isinstance(gran, PerChannel) and gran.axis % len(q.shape) == 0
    if not (per_channel or isinstance(gran, PerTensor)):
        return None
    w_scale = to_numpy(q.scale.float()).reshape(-1).astype(np.float64)
    return np.broadcast_to(w_scale, (q.shape[0],)).copy()


def _fit_zero_channels(
    layer: nn.Module, w_scale: np.ndarray, bias: np.ndarray, prefix: str
) -> np.ndarray:
    """``w_scale`` with the scale of each channel whose bias code would overflow int32 raised
    so that it fits (code about 2**30). Only a channel whose weights are all zero may be
    raised (0 times any scale is 0, so the layer's output is unchanged); ORT's own quantizer
    does the same (``AdjustWeightScaleForInt32Bias``). Raises CompactMLError otherwise."""
    s_in = float(layer.input_quant.scale)
    scale = (s_in * w_scale).astype(np.float32).astype(np.float64)
    over = np.abs(bias) > INT32_MAX * scale
    if not over.any():
        return w_scale
    rows = to_numpy(layer.qweight_data().dequantize()).reshape(len(bias), -1)
    zero = ~rows.any(axis=1)
    per_tensor = isinstance(layer.scheme.granularity, PerTensor)
    if per_tensor and not zero.all():
        zero[:] = False  # one shared scale: raising it would change the other channels
    if (over & ~zero).any():
        c = int(np.flatnonzero(over & ~zero)[0])
        raise CompactMLError(
            f"layer {prefix.removeprefix('lowered/')}: the bias of output channel {c} "
            f"({bias[c]:.3g}) is more than 2**31 steps of input_scale * weight_scale, so ONNX "
            "Runtime's int32 bias would overflow; zero that channel's weights (negligible next "
            "to its bias) or exclude the layer from quantization"
        )
    fitted = np.where(over, np.maximum(w_scale, np.abs(bias) / (s_in * 2.0**30)), w_scale)
    return np.full_like(fitted, fitted.max()) if per_tensor else fitted


def _replace(out: Any, name: str, array: np.ndarray) -> None:
    """Replace the initializer ``name`` of ``out`` (a ``Lowered``) by ``array`` (0-d kept 0-d)."""
    out.initializers[:] = [t for t in out.initializers if t.name != name]
    out.const(name, np.asarray(array))


def _int32_bias(layer: nn.Module, out: Any, prefix: str) -> None:
    """Replace the float bias initializer ``<prefix>.bias`` by int32 codes and a
    ``DequantizeLinear`` (scale ``input_scale * weight_scale``), in place, when the weight
    scale is per tensor or per output channel; a per-group weight keeps its float bias."""
    name = f"{prefix}.bias"
    has_bias = any(t.name == name for t in out.initializers)
    w_scale = _per_output_channel(layer) if has_bias else None
    if w_scale is None:
        return
    bias = to_numpy(layer.bias.float()).astype(np.float64)
    fitted = _fit_zero_channels(layer, w_scale, bias, prefix)
    if (fitted != w_scale).any():  # only all-zero channels: their weights stay exactly 0
        weight_scale = fitted.astype(np.float32)
        per_tensor = isinstance(layer.scheme.granularity, PerTensor)
        _replace(out, f"{prefix}.weight.scale", weight_scale[0] if per_tensor else weight_scale)
    scale = (float(layer.input_quant.scale) * fitted).astype(np.float32)
    codes = np.round(bias / scale.astype(np.float64)).astype(np.int32)  # fits: checked above
    out.initializers[:] = [t for t in out.initializers if t.name != name]
    inputs = [
        out.const(f"{name}.int32", codes),
        out.const(f"{name}.scale", scale),
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


def _constant(graph: Any, name: str) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a ``Constant`` node's output."""
    from onnx import numpy_helper

    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute:
            if n.attribute[0].name == "value":
                return numpy_helper.to_array(n.attribute[0].t)
    return None


def _dequantized_range(graph: Any, node: Any) -> tuple[float, float] | None:
    """``(lo, hi)``: every value a per-tensor 8-bit ``DequantizeLinear`` ``node`` can output."""
    scale = _constant(graph, node.input[1])
    zero = _constant(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or scale.size != 1 or zero is None or zero.size != 1:
        return None
    info = np.iinfo(zero.dtype)
    s, z = float(scale.reshape(())), int(zero.reshape(()))
    return (info.min - z) * s, (info.max - z) * s


def _is_identity(graph: Any, node: Any, lo: float, hi: float) -> bool:
    """Whether the ``Relu``/``Clip`` ``node`` leaves every value of ``[lo, hi]`` unchanged."""
    if node.op_type == "Relu":
        return lo >= 0.0
    if node.op_type != "Clip" or len(node.input) < 2:
        return False
    bounds = [_constant(graph, n) if n else None for n in list(node.input[1:3])]
    if any(b is None for b, n in zip(bounds, node.input[1:3], strict=False) if n):
        return False
    cmin = float(bounds[0]) if bounds[0] is not None else -np.inf
    cmax = float(bounds[1]) if len(bounds) > 1 and bounds[1] is not None else np.inf
    return cmin <= lo and hi <= cmax


def drop_identity_activations(proto: Any) -> int:
    """Remove, in place, each ``Relu`` (or ``Clip``) of ``proto`` (an ``onnx.ModelProto``)
    that reads a uint8/int8 ``DequantizeLinear`` whose codes all lie in its range (zero point
    at the lowest code: every value is >= 0), rewiring its readers to the DequantizeLinear;
    returns how many were removed. Exact: such an activation returns its input unchanged.

    Why: a functional ``torch.relu(layer(x))`` has no module to carry the quantizer after it,
    so ``Static`` quantizes the layer's output over the ReLU's range (zero point 0) and the
    traced ``Relu`` follows the ``DequantizeLinear``. ONNX Runtime only removes a ``Relu``
    *before* a ``QuantizeLinear``; one after a ``DequantizeLinear`` stays float and keeps
    the next op (a ``Concat`` into ``QLinearConcat``, an ``Add``...) from being fused."""
    graph = proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    renames, dropped = {}, []
    for node in graph.node:
        if node.op_type not in ("Relu", "Clip") or node.output[0] in outputs:
            continue
        dq = producers.get(node.input[0])
        bounds = (
            None
            if dq is None or dq.op_type != "DequantizeLinear"
            else _dequantized_range(graph, dq)
        )
        if bounds is not None and _is_identity(graph, node, *bounds):
            renames[node.output[0]] = node.input[0]
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    return len(dropped)
