"""How a ``.cml`` artifact records a module tree that differs from its base architecture.

An artifact stores weights, not code. Its manifest names the *source* of the base architecture
(``compactml.source``) and an ordered list of structural *transforms* that turn a freshly built
base into the saved model:

- ``{"op": "replace", "module": "features.0", "spec": {"type": "Conv2d", "args": {...}}}``
  puts a newly built module at that name (a shrunk layer, an ``Identity``, a quantized layer,
  or a module that is new);
- ``{"op": "delete", "module": "head.drop", "none": false}`` removes a child (or sets it None);
- ``{"op": "set", "module": "encoder.attn", "attr": "num_heads", "value": 6, "tuple": false}``
  sets a plain attribute (an int, float, bool, str, None, or a tuple/list of those), such as the
  head count of an attention block whose heads were pruned;
- ``{"op": "add_tensor", "module": "fc", "name": "mask", "kind": "buffer", "shape": [4, 8],
  "dtype": "bool", "requires_grad": false}`` registers a parameter or persistent buffer the
  base lacks (or whose shape changed); its value comes from the stored tensors;
- ``{"op": "remove_tensor", "module": "fc", "name": "bias", "none": true}`` removes one (or
  sets it None, as a layer built with ``bias=False`` holds it).

``MODULE_TYPES`` is the one literal table of module types that can be described as JSON and
rebuilt. Torch layers read their constructor arguments from their attributes; compactml layers
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

import torch
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


def _as_json(value: Any) -> str:
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
    return handler is None or _as_json(handler.describe(a)) == _as_json(handler.describe(b))


def _is_plain(value: Any, nested: bool = False) -> bool:
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple | list) and not nested:
        return all(_is_plain(v, nested=True) for v in value)
    return False


def plain_attributes(module: nn.Module) -> dict[str, Any]:
    """The public attributes of ``module`` that are plain values (see ``set`` transforms)."""
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and name != "training" and _is_plain(value)
    }


_MISSING = object()


def find_module(root: nn.Module, name: str) -> nn.Module | None:
    """The submodule at dotted ``name`` ("" is the root), or None when there is none."""
    module: nn.Module | None = root
    for part in name.split(".") if name else ():
        if module is None:
            return None
        module = module._modules.get(part)
    return module


def _parent_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    parent = find_module(root, parent_name)
    if parent is None or not leaf:
        raise ValueError(f"module {name!r} has no parent module to hold it")
    return parent, leaf


def _replace(root: nn.Module, name: str, spec: dict[str, Any]) -> nn.Module:
    current = find_module(root, name)
    handler = None if current is None else handler_for(current)
    if handler is not None and type(current).__name__ == spec["type"]:
        if _as_json(handler.describe(current)) == _as_json(spec["args"]):
            return root  # already this module (a skeleton given to load may be the final tree)
    module = build_module(spec)
    if not name:
        return module
    parent, leaf = _parent_of(root, name)
    parent._modules[leaf] = module
    return root


def _delete(root: nn.Module, name: str, to_none: bool) -> nn.Module:
    parent, leaf = _parent_of(root, name)
    if to_none:
        parent._modules[leaf] = None
    else:
        parent._modules.pop(leaf, None)
    return root


def _existing(root: nn.Module, name: str) -> nn.Module:
    module = find_module(root, name)
    if module is None:
        raise ValueError(f"module {name!r} does not exist")
    return module


def _add_tensor(root: nn.Module, name: str, op: dict[str, Any]) -> nn.Module:
    module, leaf, kind = _existing(root, name), op["name"], op["kind"]
    dtype = getattr(torch, op["dtype"], None)
    if not isinstance(dtype, torch.dtype) or not isinstance(leaf, str) or "." in leaf:
        raise ValueError(f"invalid tensor {leaf!r} of {name!r}")
    # A placeholder of the right shape: the stored values replace it when the weights load.
    tensor = torch.empty([int(n) for n in op["shape"]], dtype=dtype)
    module._parameters.pop(leaf, None)
    module._buffers.pop(leaf, None)
    if kind == "parameter":
        module.register_parameter(leaf, nn.Parameter(tensor, bool(op["requires_grad"])))
    elif kind == "buffer":
        module.register_buffer(leaf, tensor, persistent=True)
    else:
        raise ValueError(f"unknown tensor kind {kind!r}")
    return root


def _remove_tensor(root: nn.Module, name: str, leaf: str, to_none: bool) -> nn.Module:
    module = _existing(root, name)
    for table in (module._parameters, module._buffers):
        if leaf in table:
            if to_none:
                table[leaf] = None
            else:
                del table[leaf]
    return root


def _set(root: nn.Module, name: str, attr: str, value: Any, as_tuple: bool) -> nn.Module:
    module = _existing(root, name)
    owned = (module._parameters, module._buffers, module._modules)
    if attr.startswith("_") or attr == "training" or any(attr in d for d in owned):
        raise ValueError(f"attribute {attr!r} of {name!r} cannot be set by a transform")
    if not _is_plain(value):
        raise ValueError(f"value of {name}.{attr} is not a plain value")
    setattr(module, attr, tuple(value) if as_tuple and isinstance(value, list) else value)
    return root


def apply_transform(root: nn.Module, op: dict[str, Any]) -> nn.Module:
    """Apply one transform to the tree under ``root``; returns the (possibly new) root.

    Raises ValueError, KeyError or TypeError for a malformed transform.
    """
    kind, name = op["op"], op["module"]
    if not isinstance(name, str):
        raise TypeError("a transform's module name must be a string")
    if kind == "replace":
        return _replace(root, name, op["spec"])
    if kind == "delete":
        return _delete(root, name, bool(op.get("none", False)))
    if kind == "set":
        return _set(root, name, op["attr"], op["value"], bool(op.get("tuple", False)))
    if kind == "add_tensor":
        return _add_tensor(root, name, op)
    if kind == "remove_tensor":
        return _remove_tensor(root, name, op["name"], bool(op.get("none", False)))
    raise ValueError(f"unknown transform {kind!r}")


def apply_transforms(root: nn.Module, transforms: list[dict[str, Any]]) -> nn.Module:
    """Apply ``transforms`` in order to ``root`` (modified in place); returns the root."""
    for op in transforms:
        root = apply_transform(root, op)
    return root


def _child_changes(name: str, module: nn.Module, current: nn.Module) -> list[dict[str, Any]]:
    """Delete transforms for the children ``current`` has and ``module`` lacks."""
    ops = []
    for child, sub in current._modules.items():
        missing = child not in module._modules
        if sub is not None and (missing or module._modules[child] is None):
            full = f"{name}.{child}" if name else child
            ops.append({"op": "delete", "module": full, "none": not missing})
    return ops


def _saved_tensors(module: nn.Module) -> dict[str, tuple[str, torch.Tensor | None]]:
    """Parameters and persistent buffers of ``module`` itself: ``{name: (kind, tensor)}``."""
    out = {k: ("parameter", t) for k, t in module._parameters.items()}
    for leaf, tensor in module._buffers.items():
        if leaf not in module._non_persistent_buffers_set:
            out[leaf] = ("buffer", tensor)
    return out


def _tensor_changes(name: str, module: nn.Module, current: nn.Module) -> list[dict[str, Any]]:
    """Add/remove transforms for the tensors ``module`` and ``current`` hold differently."""
    want, have = _saved_tensors(module), _saved_tensors(current)
    ops = []
    for leaf, (kind, tensor) in want.items():
        old_kind, old = have.get(leaf, (None, None))
        if tensor is None and old is not None:
            ops.append({"op": "remove_tensor", "module": name, "name": leaf, "none": True})
        elif tensor is not None and (old is None or old_kind != kind or old.shape != tensor.shape):
            ops.append(
                {"op": "add_tensor", "module": name, "name": leaf, "kind": kind}
                | {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
                | {"requires_grad": bool(tensor.requires_grad)}
            )
    for leaf in sorted(set(have) - set(want)):
        ops.append({"op": "remove_tensor", "module": name, "name": leaf, "none": False})
    return ops


def _attribute_changes(name: str, module: nn.Module, current: nn.Module) -> list[dict[str, Any]]:
    """Set transforms for plain attributes of ``module`` that ``current`` lacks or differs in."""
    ops = []
    have = vars(current)
    for attr, value in plain_attributes(module).items():
        old = have.get(attr, _MISSING)
        if old is _MISSING or not _is_plain(old) or _as_json(old) != _as_json(value):
            as_tuple = isinstance(value, tuple)
            stored = list(value) if as_tuple else value
            ops.append(
                {"op": "set", "module": name, "attr": attr, "value": stored, "tuple": as_tuple}
            )
    return ops


def _tree(root: nn.Module) -> list[tuple[str, str, str]]:
    return [
        (name, type(m).__module__, type(m).__qualname__)
        for name, m in root.named_modules(remove_duplicate=False)
    ]


def _check_rebuilt(model: nn.Module, rebuilt: nn.Module) -> None:
    """Raise unless ``rebuilt`` has the module tree and weight shapes of ``model``."""
    if _tree(model) != _tree(rebuilt):
        raise CompactMLError(
            "cannot save: the module tree of the model cannot be rebuilt from its base "
            "architecture (children were reordered); save a model built by a factory instead"
        )
    want, have = model.state_dict(), rebuilt.state_dict()
    for key in sorted(set(want) | set(have)):
        shape = tuple(want[key].shape) if key in want else None
        other = tuple(have[key].shape) if key in have else None
        if shape != other:
            raise CompactMLError(
                f"cannot save: weight {key} is {shape} in the model but {other} in the "
                "architecture rebuilt from its base; change the layer with a supported module "
                "(see MODULE_TYPES in compactml/export/modules.py)"
            )


def plan_transforms(model: nn.Module, base: nn.Module) -> list[dict[str, Any]]:
    """The transforms that turn ``base`` into the architecture of ``model``.

    Walks ``model`` top-down, applying each transform to ``base`` as it is found (so a replaced
    module's own children are compared with what its constructor built), then checks that the
    result has the same module tree and weight shapes as ``model``. ``base`` is consumed.
    """
    transforms: list[dict[str, Any]] = []
    rebuilt = base
    for name, module in model.named_modules(remove_duplicate=False):
        current = find_module(rebuilt, name)
        if current is None or not same_structure(module, current):
            op = {"op": "replace", "module": name, "spec": describe_module(name, module)}
            rebuilt = apply_transform(rebuilt, op)
            transforms.append(op)
            current = find_module(rebuilt, name)
        changes = _child_changes(name, module, current) + _tensor_changes(name, module, current)
        for op in changes + _attribute_changes(name, module, current):
            rebuilt = apply_transform(rebuilt, op)
            transforms.append(op)
    _check_rebuilt(model, rebuilt)
    return transforms
