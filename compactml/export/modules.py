"""The module types a ``.cml`` artifact can describe as JSON and build again.

``MODULE_TYPES`` is the one literal table of module types that can be described as JSON and
rebuilt (by the ``replace`` and ``convert`` transforms of ``compactml.export.transforms``).
Torch layers read their constructor arguments from their attributes; compactml layers
(``QuantLinear``, ``LowRankLinear``...) describe themselves with ``compactml_spec() -> dict``
and rebuild with the classmethod ``from_compactml_spec(args)``: add them here as
``SpecLayer("compactml.quantize.modules:QuantLinear")``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from compactml.errors import CompactMLError

_CONV = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
)
_BATCHNORM = ("num_features", "eps", "momentum", "affine", "track_running_stats", "bias")
_MAXPOOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVGPOOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples torch layers hold (kernel sizes, normalized shapes)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def as_json(value: Any) -> str:
    """Canonical JSON text of a value, for comparing descriptions (tuples equal lists)."""
    return json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class TorchLayer:
    """A torch.nn layer rebuilt from its constructor arguments, read from its attributes.

    ``bias`` is the one argument not stored under its own name: it is ``module.bias is not None``.
    Arguments the installed torch does not accept (``bias`` of norms before torch 2.13) are left
    out, so one table serves every supported torch.
    """

    cls: type[nn.Module]
    args: tuple[str, ...] = ()

    def matches(self, module: nn.Module) -> bool:
        """True when this handler describes ``module`` (exactly this class, not a subclass)."""
        return type(module) is self.cls

    def describe(self, module: nn.Module) -> dict[str, Any]:
        """The constructor arguments of ``module`` as JSON-able values."""
        out = {}
        accepted = inspect.signature(self.cls).parameters
        for name in (arg for arg in self.args if arg in accepted):
            value = module.bias is not None if name == "bias" else getattr(module, name)
            out[name] = json.loads(json.dumps(value))
        return out

    def build(self, args: dict[str, Any]) -> nn.Module:
        """A new module of this type built from ``args`` (as ``describe`` wrote them)."""
        unknown = sorted(set(args) - set(self.args))
        if unknown:
            raise ValueError(f"unknown arguments {unknown} for {self.cls.__name__}")
        return self.cls(**{name: _tuples(value) for name, value in args.items()})


@dataclass(frozen=True)
class SpecLayer:
    """A compactml layer that describes itself; ``target`` is ``"package.module:ClassName"``.

    The class is imported when first needed, so this table never imports the technique packages.
    """

    target: str

    def layer_class(self) -> type[nn.Module]:
        """The layer class named by ``target``."""
        module_name, _, class_name = self.target.partition(":")
        return getattr(importlib.import_module(module_name), class_name)

    def matches(self, module: nn.Module) -> bool:
        """True when ``module`` is exactly the class named by ``target``."""
        return type(module) is self.layer_class()

    def describe(self, module: nn.Module) -> dict[str, Any]:
        """The layer's own description, ``module.compactml_spec()``."""
        return json.loads(json.dumps(module.compactml_spec()))

    def build(self, args: dict[str, Any]) -> nn.Module:
        """A new layer from ``layer_class().from_compactml_spec(args)``."""
        return self.layer_class().from_compactml_spec(args)


MODULE_TYPES: dict[str, TorchLayer | SpecLayer] = {
    "Linear": TorchLayer(nn.Linear, ("in_features", "out_features", "bias")),
    "Conv1d": TorchLayer(nn.Conv1d, _CONV),
    "Conv2d": TorchLayer(nn.Conv2d, _CONV),
    "BatchNorm1d": TorchLayer(nn.BatchNorm1d, _BATCHNORM),
    "BatchNorm2d": TorchLayer(nn.BatchNorm2d, _BATCHNORM),
    "LayerNorm": TorchLayer(
        nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine", "bias")
    ),
    "GroupNorm": TorchLayer(nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine", "bias")),
    "Embedding": TorchLayer(
        nn.Embedding,
        ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type")
        + ("scale_grad_by_freq", "sparse"),
    ),
    "Identity": TorchLayer(nn.Identity),
    "ReLU": TorchLayer(nn.ReLU, ("inplace",)),
    "ReLU6": TorchLayer(nn.ReLU6, ("inplace",)),
    "LeakyReLU": TorchLayer(nn.LeakyReLU, ("negative_slope", "inplace")),
    "GELU": TorchLayer(nn.GELU, ("approximate",)),
    "SiLU": TorchLayer(nn.SiLU, ("inplace",)),
    "Hardswish": TorchLayer(nn.Hardswish, ("inplace",)),
    "Tanh": TorchLayer(nn.Tanh),
    "Sigmoid": TorchLayer(nn.Sigmoid),
    "Softmax": TorchLayer(nn.Softmax, ("dim",)),
    "Dropout": TorchLayer(nn.Dropout, ("p", "inplace")),
    "Flatten": TorchLayer(nn.Flatten, ("start_dim", "end_dim")),
    "MaxPool1d": TorchLayer(nn.MaxPool1d, _MAXPOOL),
    "MaxPool2d": TorchLayer(nn.MaxPool2d, _MAXPOOL),
    "AvgPool1d": TorchLayer(nn.AvgPool1d, _AVGPOOL),
    "AvgPool2d": TorchLayer(nn.AvgPool2d, _AVGPOOL + ("divisor_override",)),
    "AdaptiveAvgPool1d": TorchLayer(nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": TorchLayer(nn.AdaptiveAvgPool2d, ("output_size",)),
    # compactml's compressed layers describe and rebuild themselves.
    "QuantLinear": SpecLayer("compactml.quantize.modules:QuantLinear"),
    "QuantConv2d": SpecLayer("compactml.quantize.modules:QuantConv2d"),
    "QuantEmbedding": SpecLayer("compactml.quantize.modules:QuantEmbedding"),
    "DynamicQuantLinear": SpecLayer("compactml.quantize.dynamic:DynamicQuantLinear"),
    "QuantOutput": SpecLayer("compactml.quantize.modules:QuantOutput"),
    "ScaledInput": SpecLayer("compactml.quantize.fold:ScaledInput"),
    # Containers are built empty; their children follow as transforms of their own.
    "Sequential": TorchLayer(nn.Sequential),
    "ModuleList": TorchLayer(nn.ModuleList),
    "ModuleDict": TorchLayer(nn.ModuleDict),
}


def handler_for(module: nn.Module) -> TorchLayer | SpecLayer | None:
    """The ``MODULE_TYPES`` entry that describes ``module``, or None."""
    handler = MODULE_TYPES.get(type(module).__name__)
    return handler if handler is not None and handler.matches(module) else None


def describe_module(name: str, module: nn.Module) -> dict[str, Any]:
    """``{"type": ..., "args": ...}`` for ``module``; a CompactMLError when it has no handler."""
    handler = handler_for(module)
    if handler is None:
        kind = type(module).__name__
        raise CompactMLError(
            f"cannot save module {name or '(root)'!r} of type {kind}: it differs from the base "
            f"architecture and compactml cannot rebuild a {kind} (see MODULE_TYPES in "
            "compactml/export/modules.py); keep it as in the base model or save a model whose "
            "factory builds this architecture"
        )
    return {"type": type(module).__name__, "args": handler.describe(module)}


def build_module(spec: dict[str, Any]) -> nn.Module:
    """A new module from a ``{"type", "args"}`` spec written by ``describe_module``."""
    kind, args = spec["type"], spec["args"]
    if not isinstance(args, dict):
        raise TypeError(f"arguments of {kind} must be an object")
    handler = MODULE_TYPES.get(kind)
    if handler is None:
        raise CompactMLError(
            f"the artifact needs module type {kind!r}, which this compactml version cannot "
            "build; upgrade compactml"
        )
    return handler.build(args)


def _same_type(a: nn.Module, b: nn.Module) -> bool:
    # Compare classes by name: a factory file run twice defines its classes twice.
    return (type(a).__module__, type(a).__qualname__) == (type(b).__module__, type(b).__qualname__)


def same_structure(a: nn.Module, b: nn.Module) -> bool:
    """True when ``a`` and ``b`` are the same type with the same constructor arguments."""
    if not _same_type(a, b):
        return False
    handler = handler_for(a)
    return handler is None or as_json(handler.describe(a)) == as_json(handler.describe(b))


def is_plain(value: Any, nested: bool = False) -> bool:
    """True for a value a ``set`` transform may hold: None, bool, int, finite float, str, or a
    flat tuple/list of those."""
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple | list) and not nested:
        return all(is_plain(v, nested=True) for v in value)
    return False


def plain_attributes(module: nn.Module) -> dict[str, Any]:
    """The public attributes of ``module`` that are plain values (see ``set`` transforms)."""
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and name != "training" and is_plain(value)
    }
