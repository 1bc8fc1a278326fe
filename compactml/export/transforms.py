"""How a ``.cml`` artifact records a module tree that differs from its base architecture.

An artifact stores weights, not code. Its manifest names the *source* of the base architecture
(``compactml.source``) and an ordered list of structural *transforms* that turn a freshly built
base into the saved model:

- ``{"op": "replace", "module": "features.0", "spec": {"type": "Conv2d", "args": {...}}}``
  puts a newly built module at that name (a shrunk layer, an ``Identity``, a quantized layer,
  or a module that is new), built from ``MODULE_TYPES`` (``compactml.export.modules``);
- ``{"op": "convert", "module": "features.0", "spec": {"type": "QuantConv2d", "args": {...}}}``
  is the same, with ``args`` holding only what differs from the description of the module it
  replaces (a quantized conv keeps the conv's shapes and strides and adds its scheme; a pruned
  layer records its new width alone): the module is built from that description updated with
  ``args``. ``plan_transforms`` writes it when every argument of the old module is one of the
  new module's too, and ``replace`` otherwise;
- ``{"op": "delete", "module": "head.drop", "none": false}`` removes a child (or sets it None);
- ``{"op": "set", "module": "encoder.attn", "attr": "num_heads", "value": 6, "tuple": false}``
  sets a plain attribute (an int, float, bool, str, None, or a tuple/list of those), such as the
  head count of an attention block whose heads were pruned;
- ``{"op": "add_tensor", "module": "fc", "name": "mask", "kind": "buffer", "shape": [4, 8],
  "dtype": "bool", "requires_grad": false}`` registers a parameter or persistent buffer the
  base lacks (or whose shape changed); its value comes from the stored tensors;
- ``{"op": "remove_tensor", "module": "fc", "name": "bias", "none": true}`` removes one (or
  sets it None, as a layer built with ``bias=False`` holds it);
- ``{"op": "set_config", "module": "encoder", "key": "intermediate_size", "value": 768}`` sets
  a plain entry of the module's Hugging Face ``config`` (one whose ``to_dict()`` differs from
  the base's), so a pruned model's config describes its smaller layers again after loading.

``plan_transforms`` (``compactml.export.planning``) computes them at save time;
``apply_transforms`` replays them at load time.
A malformed transform raises ValueError, KeyError or TypeError (the loader reports those as a
damaged file).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.export.modules import (
    as_json,
    build_module,
    handler_for,
    is_plain,
)
from compactml.task import tensor_nbytes

# The fields of each transform, besides "op" and "module", and their JSON types.
TRANSFORM_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "replace": {"spec": dict},
    "convert": {"spec": dict},
    "delete": {"none": bool},
    "set": {"attr": str, "value": object, "tuple": bool},
    "add_tensor": {"name": str, "kind": str, "shape": list, "dtype": str, "requires_grad": bool},
    "remove_tensor": {"name": str, "none": bool},
    "set_config": {"key": str, "value": object},
}
_MISSING = object()


def _check_fields(op: dict[str, Any]) -> None:
    fields = {"op": str, "module": str} | TRANSFORM_FIELDS[op["op"]]
    if set(op) != set(fields):
        raise ValueError(f"{op['op']} transform has fields {sorted(op)}, not {sorted(fields)}")
    for field, kind in fields.items():
        value = op[field]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise TypeError(f"field {field!r} of a {op['op']} transform has the wrong type")
    name = op["module"]
    if name and not all(name.split(".")):
        raise ValueError(f"module name {name!r} is not a dotted module path")


def _check_tensor_fields(op: dict[str, Any]) -> None:
    leaf = op["name"]
    if not leaf or "." in leaf:
        raise ValueError(f"tensor name {leaf!r} is not a plain name")
    if op["op"] != "add_tensor":
        return
    if op["kind"] not in ("parameter", "buffer"):
        raise ValueError(f"unknown tensor kind {op['kind']!r}")
    if not isinstance(getattr(torch, op["dtype"], None), torch.dtype):
        raise ValueError(f"unknown dtype {op['dtype']!r}")
    if not all(type(n) is int and n >= 0 for n in op["shape"]):
        raise ValueError(f"shape {op['shape']} is not a list of sizes >= 0")


def check_transform(op: Any) -> None:
    """Raise ValueError or TypeError unless ``op`` is a well-formed transform.

    Checks the fields and their types only, not that the module it names exists.
    """
    if not isinstance(op, dict) or op.get("op") not in TRANSFORM_FIELDS:
        kind = op.get("op") if isinstance(op, dict) else type(op).__name__
        raise ValueError(f"unknown transform {str(kind)[:40]!r}")
    _check_fields(op)
    if op["op"] in ("replace", "convert"):
        spec = op["spec"]
        if set(spec) != {"type", "args"} or not isinstance(spec["type"], str):
            raise ValueError(f"a {op['op']} transform's spec must be {{type: str, args: object}}")
        if not isinstance(spec["args"], dict):
            raise TypeError(f"arguments of {spec['type']} must be an object")
    elif op["op"] == "set":
        attr = op["attr"]
        if not attr.isidentifier() or attr.startswith("_") or attr == "training":
            raise ValueError(f"attribute {attr!r} cannot be set by a transform")
        if not is_plain(op["value"]):
            raise ValueError(f"value of {op['module']}.{attr} is not a plain value")
    elif op["op"] in ("add_tensor", "remove_tensor"):
        _check_tensor_fields(op)
    elif op["op"] == "set_config":
        key = op["key"]
        if not key.isidentifier() or key.startswith("_"):
            raise ValueError(f"config entry {key!r} cannot be set by a transform")
        if not is_plain(op["value"]):
            raise ValueError(f"value of config entry {key!r} is not a plain value")


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


def _existing(root: nn.Module, name: str) -> nn.Module:
    module = find_module(root, name)
    if module is None:
        raise ValueError(f"module {name!r} does not exist")
    return module


def _replace(root: nn.Module, name: str, spec: dict[str, Any]) -> nn.Module:
    current = find_module(root, name)
    handler = None if current is None else handler_for(current)
    if handler is not None and type(current).__name__ == spec["type"]:
        if as_json(handler.describe(current)) == as_json(spec["args"]):
            return root  # already this module (a skeleton given to load may be the final tree)
    module = build_module(spec)
    if not name:
        return module
    parent, leaf = _parent_of(root, name)
    parent._modules[leaf] = module
    return root


def description(module: nn.Module | None) -> dict[str, Any] | None:
    """The constructor arguments of ``module`` as ``MODULE_TYPES`` describes them, or None."""
    handler = None if module is None else handler_for(module)
    return None if handler is None else handler.describe(module)


def full_spec(root: nn.Module, op: dict[str, Any]) -> dict[str, Any]:
    """The spec of the module a ``replace`` or ``convert`` transform builds; for ``convert``,
    the description of the module it replaces updated with the transform's args."""
    if op["op"] == "replace":
        return op["spec"]
    base = description(_existing(root, op["module"]))
    if base is None:
        raise ValueError(
            f"module {op['module']!r} cannot be converted: its type has no description"
        )
    return {"type": op["spec"]["type"], "args": base | op["spec"]["args"]}


def _delete(root: nn.Module, name: str, to_none: bool) -> nn.Module:
    parent, leaf = _parent_of(root, name)
    if to_none:
        parent._modules[leaf] = None
    else:
        parent._modules.pop(leaf, None)
    return root


def _add_tensor(root: nn.Module, name: str, op: dict[str, Any]) -> nn.Module:
    module, leaf = _existing(root, name), op["name"]
    # A placeholder on the meta device (nothing allocated, whatever the shape): loading the
    # stored tensors replaces it, and refuses the file when the shapes differ.
    tensor = torch.empty(op["shape"], dtype=getattr(torch, op["dtype"]), device="meta")
    module._parameters.pop(leaf, None)
    module._buffers.pop(leaf, None)
    if op["kind"] == "parameter":
        module.register_parameter(leaf, nn.Parameter(tensor, op["requires_grad"]))
    else:
        module.register_buffer(leaf, tensor, persistent=True)
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
    # A class attribute that is not a plain value is a method or property ("forward"): never
    # shadow it. A plain class default (a flag) may be overridden per instance.
    on_class = inspect.getattr_static(type(module), attr, _MISSING)
    if any(attr in d for d in owned) or (on_class is not _MISSING and not is_plain(on_class)):
        raise ValueError(f"attribute {attr!r} of {name!r} cannot be set by a transform")
    setattr(module, attr, tuple(value) if as_tuple and isinstance(value, list) else value)
    return root


def config_of(module: nn.Module) -> Any:
    """The module's Hugging Face-style ``config`` (an object with ``to_dict``), or None."""
    config = vars(module).get("config")
    return config if callable(getattr(config, "to_dict", None)) else None


def _set_config(root: nn.Module, name: str, key: str, value: Any) -> nn.Module:
    config = config_of(_existing(root, name))
    if config is None:
        raise ValueError(f"module {name!r} has no config to set {key!r} in")
    if callable(getattr(type(config), key, None)) or isinstance(
        getattr(type(config), key, None), property
    ):
        raise ValueError(f"config entry {key!r} is a method or property, not a setting")
    setattr(config, key, value)
    return root


def apply_transform(root: nn.Module, op: dict[str, Any]) -> nn.Module:
    """Apply one transform to the tree under ``root``; returns the (possibly new) root.

    Raises ValueError, KeyError or TypeError for a malformed transform.
    """
    check_transform(op)
    kind, name = op["op"], op["module"]
    if kind in ("replace", "convert"):
        return _replace(root, name, full_spec(root, op))
    if kind == "delete":
        return _delete(root, name, op["none"])
    if kind == "set":
        return _set(root, name, op["attr"], op["value"], op["tuple"])
    if kind == "add_tensor":
        return _add_tensor(root, name, op)
    if kind == "set_config":
        return _set_config(root, name, op["key"], op["value"])
    return _remove_tensor(root, name, op["name"], op["none"])


def module_nbytes(spec: dict[str, Any]) -> int:
    """Bytes of every parameter and buffer the module built from ``spec`` would hold.

    The module is built on the meta device, so nothing is allocated whatever its size. Returns
    0 when it cannot be built there (building it for real then reports the problem).
    """
    try:
        with torch.device("meta"):
            probe = build_module(spec)
    except CompactMLError:
        raise
    except Exception:  # noqa: BLE001 - the real build reports the problem with its own error
        return 0
    return tensor_nbytes([*probe.parameters(), *probe.buffers()])


def apply_transforms(
    root: nn.Module, transforms: list[dict[str, Any]], max_new_bytes: int | None = None
) -> nn.Module:
    """Apply ``transforms`` in order to ``root`` (modified in place); returns the root.

    ``max_new_bytes`` bounds the bytes of all modules built by ``replace`` and ``convert``
    transforms; one that would go beyond it raises ValueError before anything is allocated.
    """
    left = max_new_bytes
    for op in transforms:
        check_transform(op)
        if left is not None and op["op"] in ("replace", "convert"):
            size = module_nbytes(full_spec(root, op))
            if size > left:
                raise ValueError(
                    f"module {op['module']!r} would hold {size} bytes, more than the file "
                    f"could fill ({left} bytes left)"
                )
            left -= size
        root = apply_transform(root, op)
    return root
