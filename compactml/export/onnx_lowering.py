"""How each compressed layer becomes ONNX nodes: the ``LOWERINGS`` table and its functions.

The exporter (:mod:`compactml.export.onnx`) traces the model with every compressed layer
replaced by a placeholder node ``compactml::Lowered(x)``; each placeholder is then replaced by
the nodes that ``LOWERINGS[type(layer)](layer, x, y, prefix)`` returns. A lowering reads the
layer's stored data (:class:`~compactml.quantize.qweight.QWeight`), never a float copy, so the
ONNX model holds the same codes, scales and zero points as the ``.cml`` artifact.

Weight forms, chosen per layer from its scheme (nothing depends on the machine):

- 4-bit ``PerGroup`` Linear weights: ONNX Runtime's contrib op ``com.microsoft.MatMulNBits``
  (``bits=4``, ``block_size`` = group size, packed codes as ORT expects: our 4-bit packing with
  rows of whole groups is already ORT's layout; float32 scales; packed uint8 zero points for
  asymmetric schemes, none for symmetric ones, whose middle code 8 is ORT's default).
- Other integer schemes, per-tensor or per-channel: int8 codes (symmetric: ``code - 2**(bits-1)``,
  no zero point) or uint8 codes with uint8 zero points (asymmetric) + ``DequantizeLinear``
  (with ``axis``) feeding ``MatMul``/``Conv``. Linear weights are stored transposed
  (``K x N``) so the DequantizeLinear feeds MatMul directly (ONNX Runtime's QDQ pattern).
- Other integer schemes, per-group: uint8 codes shaped ``(rows, groups, group)``, dequantized
  with ``Cast``, ``Sub`` (zero point) and ``Mul`` (scale), then ``Reshape``. Blocked
  ``DequantizeLinear`` (opset 21) is not used, so every lowering works at opset 13 and above.
- ``QuantEmbedding``: codes, scales and zero points are gathered row by row first
  (``Gather``), then dequantized; only the looked-up rows are decoded on each run.
- Float16/bfloat16 (``Half``) weights: a float16/bfloat16 initializer + ``Cast`` to float32.
- A strided convolution over at most :data:`S2D_MAX_CHANNELS` input channels with its own 8-bit
  input quantizer (an image network's first convolution): ``SpaceToDepth`` of the quantized
  input and a stride-1 convolution with the rearranged kernel, bit-exact and faster in ONNX
  Runtime (:func:`_space_to_depth_conv`).

In the generic (non-MatMulNBits) forms, 2, 3, 5, 6 and 7-bit codes are stored unpacked, one per
byte: such an ONNX file is larger than the ``.cml`` artifact (about 2x for 4-bit codes, 4x for
2-bit ones). A layer's ``input_quant`` (an activation quantizer) becomes
``QuantizeLinear``/``DequantizeLinear`` on its input (8 bits; other widths as the equivalent
float ``Div``/``Round``/``Clip`` ops).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import NodeProto, TensorProto, helper, numpy_helper
from torch import nn

from compactml.errors import CompactMLError
from compactml.export import onnx_static
from compactml.export.onnx_dynamic import lower_dynamic_quant_linear
from compactml.export.onnx_static import to_numpy
from compactml.quantize.act import code_range
from compactml.quantize.affine import FloatScheme, PerChannel, PerGroup, QScheme
from compactml.quantize.dynamic import DynamicQuantLinear
from compactml.quantize.modules import QuantConv2d, QuantEmbedding, QuantLinear, QuantOutput
from compactml.quantize.qweight import QWeight

#: Weight widths lowered to MatMulNBits.
MATMUL_NBITS_BITS = (4,)
MS_DOMAIN = "com.microsoft"


@dataclass
class Lowered:
    """The nodes and initializers replacing one placeholder, and the opset domains they need."""

    nodes: list[NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    domains: dict[str, int] = field(default_factory=dict)

    def const(self, name: str, array: np.ndarray) -> str:
        """Add an initializer named ``name`` and return its name."""
        # np.ascontiguousarray would turn a 0-d scalar into shape [1], and ORT only fuses
        # QLinearAdd when scales and zero points are true scalars.
        array = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        """Add a node (its name is its output's name) and return the output name."""
        domain = attrs.pop("domain", "")
        self.nodes.append(
            helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs)
        )
        return output


# ---------------------------------------------------------------- activations


def _input_qdq(layer: nn.Module, out: Lowered, x: str, prefix: str) -> str:
    """QuantizeLinear/DequantizeLinear for the layer's ``input_quant``; returns the new input."""
    quant = getattr(layer, "input_quant", None)
    if quant is None:
        return x
    bits, signed = int(quant.bits), bool(quant.signed)
    scale = np.float32(to_numpy(quant.scale).reshape(()))
    zero = int(to_numpy(quant.zero_point).reshape(()))
    if bits == 8:
        zdtype = np.int8 if signed else np.uint8
        s = out.const(f"{prefix}.input_scale", np.array(scale, np.float32))
        z = out.const(f"{prefix}.input_zero_point", np.array(zero, zdtype))
        q = out.node("QuantizeLinear", [x, s, z], f"{prefix}.input_q")
        return out.node("DequantizeLinear", [q, s, z], f"{prefix}.input_dq")
    # Narrower activations: the same arithmetic in float (no int4 activation type in opset 17).
    qmin, qmax = code_range(bits, signed)
    s = out.const(f"{prefix}.input_scale", np.array(scale, np.float32))
    z = out.const(f"{prefix}.input_zero_point", np.array(zero, np.float32))
    lo = out.const(f"{prefix}.input_qmin", np.array(qmin, np.float32))
    hi = out.const(f"{prefix}.input_qmax", np.array(qmax, np.float32))
    r = out.node("Round", [out.node("Div", [x, s], f"{prefix}.input_div")], f"{prefix}.input_round")
    c = out.node("Clip", [out.node("Add", [r, z], f"{prefix}.input_add")], f"{prefix}.input_clip")
    out.nodes[-1].input.extend([lo, hi])
    d = out.node("Sub", [c, z], f"{prefix}.input_sub")
    return out.node("Mul", [d, s], f"{prefix}.input_fq")


# ---------------------------------------------------------------- weights


def _float_weight(q: QWeight, out: Lowered, name: str, transpose: bool) -> str:
    """A float16/bfloat16 initializer + Cast to float32."""
    data = q.data.T if transpose else q.data
    if q.data.dtype == torch.bfloat16:
        raw = data.contiguous().view(torch.int16).numpy().tobytes()
        init = helper.make_tensor(name + ".half", TensorProto.BFLOAT16, data.shape, raw, raw=True)
        out.initializers.append(init)
    else:
        out.const(name + ".half", to_numpy(data.contiguous()).astype(np.float16))
    return out.node("Cast", [name + ".half"], name, to=TensorProto.FLOAT)


def _dequantize_linear(q: QWeight, out: Lowered, name: str, transpose: bool) -> str:
    """Per-tensor / per-channel codes + DequantizeLinear (transposed for a Linear weight)."""
    scheme: QScheme = q.scheme
    codes = q.codes().to(torch.int16)
    axis = (
        scheme.granularity.axis % codes.dim() if isinstance(scheme.granularity, PerChannel) else 0
    )
    if transpose:
        codes, axis = codes.T, 1 - axis
    if scheme.symmetric:
        data = (codes - scheme.mid).to(torch.int8)
        zero = np.zeros(q.scale.shape, np.int8)
    else:
        data, zero = codes.to(torch.uint8), to_numpy(q.zero).astype(np.uint8)
    inputs = [
        out.const(name + ".codes", to_numpy(data.contiguous())),
        out.const(name + ".scale", to_numpy(q.scale.float())),
        out.const(name + ".zero_point", zero),
    ]
    attrs = {"axis": axis} if isinstance(scheme.granularity, PerChannel) else {}
    return out.node("DequantizeLinear", inputs, name, **attrs)


def _grouped_arrays(q: QWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes ``(rows, groups, group)`` uint8, scales and float zero points ``(rows, groups, 1)``."""
    scheme: QScheme = q.scheme
    rows, size = q.shape[0], scheme.granularity.size
    codes = to_numpy(q.codes()).reshape(rows, -1, size)
    scale = to_numpy(q.scale.float()).reshape(rows, -1, 1)
    zero = (
        np.full_like(scale, scheme.mid) if q.zero is None else to_numpy(q.zero).astype(np.float32)
    )
    return codes, scale, zero.reshape(rows, -1, 1)


def _dequantize_groups(
    out: Lowered, name: str, codes: str, zero: str, scale: str, shape: str
) -> str:
    """``Reshape((float(codes) - zero) * scale, shape)``."""
    f = out.node("Cast", [codes], name + ".codes_f", to=TensorProto.FLOAT)
    d = out.node("Sub", [f, zero], name + ".centered")
    return out.node("Reshape", [out.node("Mul", [d, scale], name + ".scaled"), shape], name)


def _grouped_weight(q: QWeight, out: Lowered, name: str, transpose: bool) -> str:
    """Per-group codes dequantized with Cast/Sub/Mul, reshaped to the weight's shape."""
    codes, scale, zero = _grouped_arrays(q)
    shape = out.const(name + ".shape", np.array(q.shape, np.int64))
    w = _dequantize_groups(
        out,
        name + (".rows" if transpose else ""),
        out.const(name + ".codes", codes),
        out.const(name + ".zero_point", zero),
        out.const(name + ".scale", scale),
        shape,
    )
    return out.node("Transpose", [w], name, perm=[1, 0]) if transpose else w


def _weight(q: QWeight, out: Lowered, name: str, transpose: bool = False) -> str:
    """The float32 weight (transposed to ``in x out`` for a Linear) from the stored data."""
    if isinstance(q.scheme, FloatScheme):
        return _float_weight(q, out, name, transpose)
    if q.codebook is not None:
        raise CompactMLError(
            f"layer {name} has a codebook weight, which ONNX export does not lower yet; "
            "export the model before clustering"
        )
    if isinstance(q.scheme.granularity, PerGroup):
        return _grouped_weight(q, out, name, transpose)
    return _dequantize_linear(q, out, name, transpose)


# ---------------------------------------------------------------- layers


def _add_bias(layer: nn.Module, out: Lowered, h: str, y: str, prefix: str) -> None:
    if layer.bias is None:
        out.node("Identity", [h], y)
    else:
        b = out.const(f"{prefix}.bias", to_numpy(layer.bias.float()))
        out.node("Add", [h, b], y)


def matmul_nbits_ok(layer: QuantLinear) -> bool:
    """Whether ``layer`` can run as ORT's MatMulNBits (4-bit, groups of 16 or more along K)."""
    scheme = layer.scheme
    return (
        isinstance(scheme, QScheme)
        and scheme.bits in MATMUL_NBITS_BITS
        and isinstance(scheme.granularity, PerGroup)
        and scheme.granularity.size >= 16
        and layer.in_features % scheme.granularity.size == 0
    )


def _pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """Zero points ``(N, groups)`` packed per row as MatMulNBits reads them (low bits first)."""
    per_byte = 8 // bits
    rows, groups = zero.shape
    padded = np.zeros((rows, -(-groups // per_byte) * per_byte), np.uint8)
    padded[:, :groups] = zero
    lanes = padded.reshape(rows, -1, per_byte)
    packed = np.zeros(lanes.shape[:2], np.uint8)
    for lane in range(per_byte):
        packed |= (lanes[:, :, lane] << (lane * bits)).astype(np.uint8)
    return packed.reshape(-1)


def lower_matmul_nbits(layer: QuantLinear, x: str, y: str, prefix: str) -> Lowered:
    """``QuantLinear`` (4-bit, per-group) as ``com.microsoft.MatMulNBits`` (+ Add for bias)."""
    out = Lowered(domains={MS_DOMAIN: 1})
    x = _input_qdq(layer, out, x, prefix)
    q = layer.qweight_data()
    bits, size = q.scheme.bits, q.scheme.granularity.size
    n, k = layer.out_features, layer.in_features
    blob = to_numpy(q.data).reshape(n, k // size, size * bits // 8)
    inputs = [
        x,
        out.const(f"{prefix}.weight.packed", blob),
        out.const(f"{prefix}.weight.scale", to_numpy(q.scale.float()).reshape(-1)),
    ]
    if q.zero is not None:
        inputs.append(
            out.const(f"{prefix}.weight.zero_point", _pack_zero_points(to_numpy(q.zero), bits))
        )
    attrs = {"K": k, "N": n, "bits": bits, "block_size": size}
    h = out.node(
        "MatMulNBits",
        inputs,
        f"{prefix}.matmul",
        domain=MS_DOMAIN,
        accuracy_level=0,  # onnx.export sets it from its accuracy_level argument
        **attrs,
    )
    _add_bias(layer, out, h, y, prefix)
    return out


def lower_quant_linear(layer: QuantLinear, x: str, y: str, prefix: str) -> Lowered:
    """``QuantLinear``: MatMulNBits when it fits (see ``matmul_nbits_ok``), else the dequantized
    weight (``in x out``) feeding ``MatMul`` (+ ``Add`` for the bias)."""
    if matmul_nbits_ok(layer):
        return lower_matmul_nbits(layer, x, y, prefix)
    out = Lowered()
    x = _input_qdq(layer, out, x, prefix)
    w = _weight(layer.qweight_data(), out, f"{prefix}.weight", transpose=True)
    _add_bias(layer, out, out.node("MatMul", [x, w], f"{prefix}.matmul"), y, prefix)
    return out


def _conv_pads(layer: QuantConv2d) -> list[int]:
    """ONNX ``pads`` (``[top, left, bottom, right]``) of the layer's padding argument."""
    if layer.padding == "valid":
        return [0, 0, 0, 0]
    if layer.padding == "same":
        totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size, strict=True)]
        return [t // 2 for t in totals] + [t - t // 2 for t in totals]
    return [int(p) for p in layer.padding] * 2


PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}  # torch -> ONNX Pad


def _pad_input(layer: QuantConv2d, out: Lowered, x: str, prefix: str) -> str:
    """An explicit ``Pad`` for non-zero padding modes (``circular`` needs opset 19)."""
    top, left, bottom, right = _conv_pads(layer)
    pads = out.const(f"{prefix}.pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
    return out.node("Pad", [x, pads], f"{prefix}.pad", mode=PAD_MODES[layer.padding_mode])


#: Largest input channel count of a strided convolution exported in space-to-depth form.
S2D_MAX_CHANNELS = 4
#: Set on a compressed layer (of the exporter's copy) to the shape of its input when traced.
TRACED_SHAPE_ATTR = "_compactml_traced_input_shape"


def _s2d_pads(layer: QuantConv2d) -> list[int] | None:
    """ONNX ``Pad`` pads (``[0, 0, top, left, 0, 0, bottom, right]``) for the space-to-depth
    form of ``layer`` (see :func:`_space_to_depth_conv`), or None when it does not apply."""
    quant, shape = layer.input_quant, getattr(layer, TRACED_SHAPE_ATTR, None)
    q = layer.qweight_data()
    stride = layer.stride[0]
    if (
        quant is None or int(quant.bits) != 8 or shape is None or len(shape) != 4
        or layer.padding_mode != "zeros" or layer.groups != 1 or tuple(layer.dilation) != (1, 1)
        or stride < 2 or tuple(layer.stride) != (stride, stride)
        or layer.in_channels > S2D_MAX_CHANNELS or min(layer.kernel_size) < stride
        or isinstance(q.scheme, FloatScheme) or q.codebook is not None
        or isinstance(q.scheme.granularity, PerGroup)
    ):  # fmt: skip
        return None
    top, left, bottom, right = _conv_pads(layer)
    ends = []
    sides = zip(shape[2:], (top, left), (bottom, right), layer.kernel_size, strict=True)
    for size, start, end, k in sides:
        out_size = (size + start + end - k) // stride + 1
        wide = -(-k // stride) * stride  # the kernel rounded up to whole blocks
        ends.append(stride * (out_size - 1) + wide - size - start)  # pad so blocks fit exactly
    if min(ends) < 0:
        return None
    return [0, 0, top, left, 0, 0, ends[0], ends[1]]


def _s2d_weight(q: QWeight, block: int) -> QWeight:
    """The codes of a ``(out, in, kh, kw)`` weight for the space-to-depth input: the kernel is
    extended to whole blocks with the code of zero, and the block offsets become input
    channels in ``SpaceToDepth``'s order (``(row offset, column offset, channel)``)."""
    codes = q.codes()
    o, c, kh, kw = codes.shape
    wh, ww = -(-kh // block) * block, -(-kw // block) * block
    if q.scheme.symmetric:
        fill = torch.full((o, 1, 1, 1), q.scheme.mid, dtype=codes.dtype)
    else:
        fill = q.zero.reshape(-1, 1, 1, 1).to(codes.dtype).expand(o, 1, 1, 1)
    wide = fill.expand(o, c, wh, ww).clone()
    wide[:, :, :kh, :kw] = codes
    wide = wide.reshape(o, c, wh // block, block, ww // block, block).permute(0, 3, 5, 1, 2, 4)
    codes = wide.reshape(o, block * block * c, wh // block, ww // block)
    return QWeight.from_codes(codes, q.scale, q.zero, q.scheme)


def _space_to_depth_conv(layer: QuantConv2d, out: Lowered, x: str, y: str, prefix: str) -> None:
    """A strided convolution over few input channels (a network's first convolution on an RGB
    image) as a stride-1 convolution over ``SpaceToDepth`` of its quantized input.

    Block ``s`` = the stride: the uint8 input codes are padded with their zero point (so that
    whole blocks cover every window), rearranged to ``s*s*C`` channels of ``H/s x W/s``, and
    convolved with the kernel cut into ``s x s`` blocks. Each output is the same sum of the same
    integer products (plus products with zero-valued padding), so the result is bit-exact, and
    ONNX Runtime's integer convolution runs faster on ``s*s*C`` channels than on 3 (on this
    project's CPU: 0.44 ms against 0.57 ms for ResNet's 7x7/2 stem at 224x224)."""
    pads = _s2d_pads(layer)
    block = layer.stride[0]
    quant = layer.input_quant
    zdtype = np.int8 if bool(quant.signed) else np.uint8
    s = out.const(f"{prefix}.input_scale", np.array(to_numpy(quant.scale).reshape(()), np.float32))
    z = out.const(
        f"{prefix}.input_zero_point", np.array(int(to_numpy(quant.zero_point).reshape(())), zdtype)
    )
    q = out.node("QuantizeLinear", [x, s, z], f"{prefix}.input_q")
    p = out.const(f"{prefix}.s2d_pads", np.array(pads, np.int64))
    padded = out.node("Pad", [q, p, z], f"{prefix}.input_padded", mode="constant")
    blocks = out.node("SpaceToDepth", [padded], f"{prefix}.input_s2d", blocksize=block)
    dq = out.node("DequantizeLinear", [blocks, s, z], f"{prefix}.input_dq")
    inputs = [dq, _weight(_s2d_weight(layer.qweight_data(), block), out, f"{prefix}.weight")]
    if layer.bias is not None:
        inputs.append(out.const(f"{prefix}.bias", to_numpy(layer.bias.float())))
    kernel = [-(-k // block) for k in layer.kernel_size]
    out.node("Conv", inputs, y, kernel_shape=kernel, strides=[1, 1], pads=[0, 0, 0, 0])


def lower_quant_conv2d(layer: QuantConv2d, x: str, y: str, prefix: str) -> Lowered:
    """``QuantConv2d``: the dequantized weight feeding ``Conv`` (after a ``Pad`` for the
    reflect, replicate and circular padding modes); a strided convolution over at most
    :data:`S2D_MAX_CHANNELS` quantized input channels in space-to-depth form."""
    out = Lowered()
    if _s2d_pads(layer) is not None:
        _space_to_depth_conv(layer, out, x, y, prefix)
        return out
    x = _input_qdq(layer, out, x, prefix)
    zeros = layer.padding_mode == "zeros"
    if not zeros:
        x = _pad_input(layer, out, x, prefix)
    inputs = [x, _weight(layer.qweight_data(), out, f"{prefix}.weight")]
    if layer.bias is not None:
        inputs.append(out.const(f"{prefix}.bias", to_numpy(layer.bias.float())))
    attrs = {
        "kernel_shape": list(layer.kernel_size),
        "strides": list(layer.stride),
        "pads": _conv_pads(layer) if zeros else [0, 0, 0, 0],
        "dilations": list(layer.dilation),
        "group": layer.groups,
    }
    out.node("Conv", inputs, y, **attrs)
    return out


def _row_wise(q: QWeight) -> bool:
    """True when every row of an embedding table has its own scales (gather them with it)."""
    gran = q.scheme.granularity
    return isinstance(gran, PerGroup) or (isinstance(gran, PerChannel) and gran.axis % 2 == 0)


def lower_quant_embedding(layer: QuantEmbedding, ids: str, y: str, prefix: str) -> Lowered:
    """``QuantEmbedding``: gather the looked-up rows' codes (and scales), then dequantize them."""
    out = Lowered()
    q = layer.qweight_data()
    if isinstance(q.scheme, FloatScheme) or q.codebook is not None or not _row_wise(q):
        out.node("Gather", [_weight(q, out, f"{prefix}.weight"), ids], y, axis=0)
        return out
    rows, dim = q.shape
    if isinstance(q.scheme.granularity, PerGroup):
        codes, scale, zero = _grouped_arrays(q)
    else:  # per row: one group as wide as the row
        codes = to_numpy(q.codes()).reshape(rows, 1, dim)
        scale = to_numpy(q.scale.float()).reshape(rows, 1, 1)
        mid = np.full_like(scale, q.scheme.mid)
        zero = mid if q.zero is None else to_numpy(q.zero).astype(np.float32).reshape(rows, 1, 1)
    gathered = [
        out.node(
            "Gather", [out.const(f"{prefix}.weight.{part}", arr), ids], f"{prefix}.{part}_rows"
        )
        for part, arr in (("codes", codes), ("zero_point", zero), ("scale", scale))
    ]
    ids_shape = out.node("Shape", [ids], f"{prefix}.ids_shape")
    last = out.const(f"{prefix}.dim", np.array([dim], np.int64))
    shape = out.node("Concat", [ids_shape, last], f"{prefix}.out_shape", axis=0)
    _dequantize_groups(out, y, *gathered, shape)
    return out


Lowering = Callable[[nn.Module, str, str, str], Lowered]

#: Compressed layer type -> the function that lowers it to ONNX nodes (exact types).
LOWERINGS: dict[type[nn.Module], Lowering] = {
    QuantLinear: onnx_static.lower_static_linear,  # lower_quant_linear + output_quant / int32 bias
    QuantConv2d: onnx_static.lower_static_conv2d,  # lower_quant_conv2d + output_quant / int32 bias
    QuantEmbedding: lower_quant_embedding,
    DynamicQuantLinear: lower_dynamic_quant_linear,
    QuantOutput: onnx_static.lower_quant_output,
}
