"""Weight-quantized layers: ``QuantLinear``, ``QuantConv2d``, ``QuantEmbedding``.

Each holds its compressed weight as persistent buffers (so a ``.cml`` artifact stores the packed
codes natively): ``qweight`` (packed uint8 codes, or the float16/bfloat16 weight for a
:class:`~compactml.quantize.affine.FloatScheme`), ``scale`` and ``zero`` (when the scheme has
them); the bias stays a float Parameter. ``forward`` rebuilds the float32 weight from the
buffers on every call (nothing cached, nothing extra saved) and runs the float op, so inputs
stay float32 and outputs equal the float op on :meth:`QuantWeightMixin.qweight_data`'s
dequantized weight exactly.

``QuantLinear`` and ``QuantConv2d`` may hold an ``input_quant`` child
(:class:`~compactml.quantize.act.ActQuant`, None by default) that fake-quantizes the input before
the float op: static and QAT models quantize activations too; static models may also hold an
``output_quant`` (applied to the output). :class:`QuantOutput` quantizes the output of any other
module (an activation, a pooling layer).

``compactml_spec()`` / ``from_compactml_spec(args)`` describe and rebuild a layer for the
artifact (``SpecLayer`` in ``compactml/export/modules.py``); the spec records the input
quantizer's ``bits`` and ``signed`` (its scale and zero point are buffers, stored as tensors).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.errors import CompactMLError
from compactml.quantize.act import ActQuant
from compactml.quantize.affine import Scheme, scheme_from_dict
from compactml.quantize.qweight import QWeight
from compactml.task import tensor_nbytes


class QuantWeightMixin:
    """Storage shared by the quantized layers: buffers in, :class:`QWeight` out."""

    scheme: Scheme
    weight_shape: tuple[int, ...]

    def _init_storage(self, scheme: Scheme, shape: tuple[int, ...]) -> None:
        self.scheme = scheme
        self.weight_shape = tuple(int(n) for n in shape)
        empty = QWeight.empty_tensors(scheme, self.weight_shape)
        self.register_buffer("qweight", empty["data"])
        for name in ("scale", "zero"):
            if empty[name] is not None:
                self.register_buffer(name, empty[name])

    def _store(self, q: QWeight) -> None:
        """Copy ``q``'s tensors into the buffers (shapes must match the scheme and shape)."""
        self.qweight = q.data
        if q.scale is not None:
            self.scale = q.scale
        if q.zero is not None:
            self.zero = q.zero

    def qweight_data(self) -> QWeight:
        """The stored weight as plain :class:`QWeight` data (views of the buffers)."""
        buffers = self._buffers
        return QWeight(
            buffers["qweight"],
            buffers.get("scale"),
            buffers.get("zero"),
            self.scheme,
            self.weight_shape,
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight (computed on each access, never stored)."""
        return self.qweight_data().dequantize()

    def storage_bytes(self) -> int:
        """Exact bytes this layer stores: packed weight, scales, zero points and bias."""
        own = list(self._buffers.values()) + list(self._parameters.values())
        return tensor_nbytes([t for t in own if t is not None])

    def _scheme_repr(self) -> str:
        return f"weight={self.scheme.describe()}"


def _float_args(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias in the input's float dtype (float32 inputs need no cast)."""
    if x.is_floating_point() and x.dtype != weight.dtype:
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    return weight, bias


def _quant_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the layer's ``input_quant`` when it has one."""
    quant = layer.input_quant
    return x if quant is None else quant(x)


def _quant_output(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``y`` through the layer's ``output_quant`` when it has one."""
    quant = layer.output_quant
    return y if quant is None else quant(y)


def _input_quant_spec(layer: nn.Module) -> dict[str, Any]:
    """``{"input_quant": {"bits", "signed"}}`` when the layer has one, else ``{}`` (older
    artifacts, and layers without one, carry no such key)."""
    out = {}
    for key in ("input_quant", "output_quant"):
        quant = getattr(layer, key)
        if quant is not None:
            out[key] = {"bits": quant.bits, "signed": quant.signed}
    return out


def _attach_input_quant(
    layer: nn.Module, spec: dict[str, Any] | None, output: dict[str, Any] | None = None
) -> nn.Module:
    """Give ``layer`` empty ``ActQuant`` input (and output) quantizers described by ``spec``
    (and ``output``); scales and zero points are filled by load_state_dict. Returns ``layer``."""
    if spec is not None:
        layer.input_quant = ActQuant(bits=int(spec["bits"]), signed=bool(spec["signed"]))
    if output is not None:
        layer.output_quant = ActQuant(bits=int(output["bits"]), signed=bool(output["signed"]))
    return layer


def _bias_from(module: nn.Module) -> nn.Parameter | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else nn.Parameter(bias.detach().clone(), bias.requires_grad)


def linear_spec(layer: nn.Module) -> dict[str, Any]:
    """The constructor arguments every linear-shaped quantized layer shares, as JSON values."""
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "scheme": layer.scheme.to_dict(),
    }


class QuantLinear(QuantWeightMixin, nn.Module):
    """``nn.Linear`` with a compressed weight; computes ``x @ W.T + b`` in float."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: Scheme) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_storage(scheme, (self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.input_quant: ActQuant | None = None
        self.output_quant: ActQuant | None = None

    @classmethod
    def from_float(cls, module: nn.Linear, scheme: Scheme, clip: str = "none") -> QuantLinear:
        """Quantize ``module``'s weight (the module itself is not changed)."""
        return cls.from_qweight(QWeight.from_float(module.weight, scheme, clip), module.bias)

    @classmethod
    def from_qweight(cls, q: QWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        """A layer holding ``q`` (an ``(out, in)`` weight chosen elsewhere, e.g. by GPTQ) and a
        copy of ``bias``."""
        if len(q.shape) != 2:
            raise CompactMLError(f"a QuantLinear needs a 2-D weight, got shape {q.shape}")
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bias is not None, q.scheme)
        layer._store(q)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), bias.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear`` with the dequantized weight (on the quantized input, if ``input_quant``)."""
        x = _quant_input(self, x)
        weight, bias = _float_args(x, self.weight, self.bias)
        return _quant_output(self, F.linear(x, weight, bias))

    def compactml_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON-able values."""
        return linear_spec(self) | _input_quant_spec(self)

    @classmethod
    def from_compactml_spec(cls, args: dict[str, Any]) -> QuantLinear:
        """An empty layer of the described shapes (its buffers are filled by load_state_dict)."""
        scheme = scheme_from_dict(args["scheme"])
        layer = cls(args["in_features"], args["out_features"], bool(args["bias"]), scheme)
        return _attach_input_quant(layer, args.get("input_quant"), args.get("output_quant"))

    def extra_repr(self) -> str:
        """Shapes and arguments, and the weight's storage scheme (shown by ``print``)."""
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, " + (
            f"bias={bias}, {self._scheme_repr()}"
        )


_CONV_ARGS = ("stride", "padding", "dilation", "groups", "padding_mode")


def _pair(value: Any) -> Any:
    if isinstance(value, str):
        return value
    return tuple(value) if isinstance(value, list | tuple) else (int(value), int(value))


def _reversed_padding(padding: Any, kernel: tuple, dilation: tuple) -> list[int]:
    """Padding for ``F.pad`` (last dimension first), as ``nn.Conv2d`` computes it."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        out = [0, 0, 0, 0]
        for i, (d, k) in enumerate(zip(dilation, kernel, strict=True)):
            total = d * (k - 1)
            j = 2 * (len(kernel) - 1 - i)
            out[j], out[j + 1] = total // 2, total - total // 2
        return out
    return [p for p in reversed(padding) for _ in range(2)]


class QuantConv2d(QuantWeightMixin, nn.Module):
    """``nn.Conv2d`` with a compressed weight; every convolution argument is kept."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        bias: bool,
        scheme: Scheme,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.padding_mode = int(groups), padding_mode
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._init_storage(scheme, shape)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self.input_quant: ActQuant | None = None
        self.output_quant: ActQuant | None = None

    @classmethod
    def from_float(cls, module: nn.Conv2d, scheme: Scheme, clip: str = "none") -> QuantConv2d:
        """Quantize ``module``'s weight (the module itself is not changed)."""
        kwargs = {name: getattr(module, name) for name in _CONV_ARGS}
        layer = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.bias is not None,
            scheme,
            **kwargs,
        )
        layer._store(QWeight.from_float(module.weight, scheme, clip))
        layer.bias = _bias_from(module)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.conv2d`` with the dequantized weight (non-zero padding modes pad first), on the
        quantized input when the layer has an ``input_quant``."""
        x = _quant_input(self, x)
        weight, bias = _float_args(x, self.weight, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            pads = _reversed_padding(self.padding, self.kernel_size, self.dilation)
            x, padding = F.pad(x, pads, mode=self.padding_mode), (0, 0)
        y = F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
        return _quant_output(self, y)

    def compactml_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON-able values."""
        spec = {name: getattr(self, name) for name in _CONV_ARGS}
        spec |= {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "bias": self.bias is not None,
            "scheme": self.scheme.to_dict(),
        }
        return spec | _input_quant_spec(self)

    @classmethod
    def from_compactml_spec(cls, args: dict[str, Any]) -> QuantConv2d:
        """An empty layer of the described shapes (its buffers are filled by load_state_dict)."""
        args = dict(args)
        scheme = scheme_from_dict(args.pop("scheme"))
        input_quant = args.pop("input_quant", None)
        output_quant = args.pop("output_quant", None)
        return _attach_input_quant(cls(scheme=scheme, **args), input_quant, output_quant)

    def extra_repr(self) -> str:
        """Shapes and arguments, and the weight's storage scheme (shown by ``print``)."""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, "
            f"padding_mode={self.padding_mode}, {self._scheme_repr()}"
        )


class QuantEmbedding(QuantWeightMixin, nn.Module):
    """``nn.Embedding`` with a compressed table; a lookup decodes only the rows it reads.

    ``max_norm`` (which rewrites the stored table during lookups) is not supported.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, scheme: Scheme, padding_idx: int | None
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = padding_idx
        self._init_storage(scheme, (self.num_embeddings, self.embedding_dim))

    @classmethod
    def from_float(cls, module: nn.Embedding, scheme: Scheme, clip: str = "none") -> QuantEmbedding:
        """Quantize ``module``'s table (the module itself is not changed)."""
        if module.max_norm is not None:
            raise CompactMLError(
                "an Embedding with max_norm rewrites its table during lookups and cannot be "
                "quantized; build it with max_norm=None or exclude it"
            )
        layer = cls(module.num_embeddings, module.embedding_dim, scheme, module.padding_idx)
        layer._store(QWeight.from_float(module.weight, scheme, clip))
        return layer

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``weight[index]`` as float32."""
        return self.qweight_data().rows(index)

    def compactml_spec(self) -> dict[str, Any]:
        """Constructor arguments as JSON-able values."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
            "scheme": self.scheme.to_dict(),
        }

    @classmethod
    def from_compactml_spec(cls, args: dict[str, Any]) -> QuantEmbedding:
        """An empty layer of the described shapes (its buffers are filled by load_state_dict)."""
        scheme = scheme_from_dict(args["scheme"])
        return cls(args["num_embeddings"], args["embedding_dim"], scheme, args["padding_idx"])

    def extra_repr(self) -> str:
        """Shapes and arguments, and the weight's storage scheme (shown by ``print``)."""
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, {self._scheme_repr()}"


class QuantOutput(nn.Module):
    """``quant(inner(x))``: the output of ``inner`` (a ReLU, a max pool...) fake-quantized by
    the activation quantizer ``quant``. Static quantization wraps activations with it so the
    tensor that several layers read, or that a residual add produced, is quantized once."""

    def __init__(self, inner: nn.Module, quant: ActQuant) -> None:
        super().__init__()
        self.inner, self.quant = inner, quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``inner(x)``, quantized."""
        return self.quant(self.inner(x))

    def compactml_spec(self) -> dict[str, Any]:
        """The inner module's description (as the artifact writes modules) and the
        quantizer's ``bits`` and ``signed``."""
        from compactml.export.modules import describe_module  # the artifact's module table

        quant = {"bits": self.quant.bits, "signed": self.quant.signed}
        return {"inner": describe_module("inner", self.inner), "quant": quant}

    @classmethod
    def from_compactml_spec(cls, args: dict[str, Any]) -> QuantOutput:
        """An empty wrapper (its quantizer's buffers are filled by load_state_dict)."""
        from compactml.export.modules import build_module

        quant = ActQuant(bits=int(args["quant"]["bits"]), signed=bool(args["quant"]["signed"]))
        return cls(build_module(args["inner"]), quant)


#: Float layer type -> its quantized replacement (exact types: subclasses may change forward).
QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
}
