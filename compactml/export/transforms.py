"""How a ``.cml`` artifact records a module tree that differs from its base architecture.

An artifact stores weights, not code. Its manifest names the *source* of the base architecture
(``compactml.source``) and an ordered list of structural *transforms* that turn a freshly built
base into the saved model:

- ``{"op": "replace", "module": "features.0", "spec": {"type": "Conv2d", "args": {...}}}``
  puts a newly built module at that name (a shrunk layer, an ``Identity``, a quantized layer,
  or a module that is new), built from ``MODULE_TYPES`` (``compactml.export.modules``);
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

``plan_transforms`` computes them at save time; ``apply_transforms`` replays them at load time.
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
    describe_module,
    handler_for,
    is_plain,
    plain_attributes,
    same_structure,
)
from compactml.task import tensor_nbytes

# The fields of each transform, besides "op" and "module", and their JSON types.
TRANSFORM_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "replace": {"spec": dict},
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
    if op["op"] == "replace":
        spec = op["spec"]
        if set(spec) != {"type", "args"} or not isinstance(spec["type"], str):
            raise ValueError("a replace transform's spec must be {type: str, args: object}")
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


def _config_of(module: nn.Module) -> Any:
    """The module's Hugging Face-style ``config`` (an object with ``to_dict``), or None."""
    config = vars(module).get("config")
    return config if callable(getattr(config, "to_dict", None)) else None


def _set_config(root: nn.Module, name: str, key: str, value: Any) -> nn.Module:
    config = _config_of(_existing(root, name))
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
    if kind == "replace":
        return _replace(root, name, op["spec"])
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

    ``max_new_bytes`` bounds the bytes of all modules built by ``replace`` transforms together;
    a transform that would go beyond it raises ValueError before anything is allocated.
    """
    left = max_new_bytes
    for op in transforms:
        check_transform(op)
        if left is not None and op["op"] == "replace":
            size = module_nbytes(op["spec"])
            if size > left:
                raise ValueError(
                    f"module {op['module']!r} would hold {size} bytes, more than the file "
                    f"could fill ({left} bytes left)"
                )
            left -= size
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
        if old is _MISSING or not is_plain(old) or as_json(old) != as_json(value):
            as_tuple = isinstance(value, tuple)
            stored = list(value) if as_tuple else value
            ops.append(
                {"op": "set", "module": name, "attr": attr, "value": stored, "tuple": as_tuple}
            )
    return ops


def _config_changes(name: str, module: nn.Module, current: nn.Module) -> list[dict[str, Any]]:
    """Set-config transforms for the plain config entries ``module`` and ``current`` differ in
    (modules sharing one config object are compared once: the first change updates them all)."""
    want, have = _config_of(module), _config_of(current)
    if want is None or have is None:
        return []
    old = have.to_dict()
    return [
        {"op": "set_config", "module": name, "key": key, "value": value}
        for key, value in sorted(want.to_dict().items())
        if key.isidentifier()
        and not key.startswith("_")
        and is_plain(value)
        and (key not in old or as_json(old[key]) != as_json(value))
    ]


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
        changes += _attribute_changes(name, module, current)
        for op in changes + _config_changes(name, module, current):
            rebuilt = apply_transform(rebuilt, op)
            transforms.append(op)
    _check_rebuilt(model, rebuilt)
    return transforms
