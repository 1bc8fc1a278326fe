"""Planning the transforms of a ``.cml`` artifact: the diff from a base architecture to a model.

``plan_transforms`` walks the model top-down against a freshly built base and writes the
transforms (``compactml.export.transforms``) that turn one into the other: ``replace`` or
``convert`` for a changed module, ``delete`` for a removed child, ``add_tensor`` and
``remove_tensor`` for parameters and buffers, ``set`` for plain attributes and ``set_config``
for Hugging Face config entries. It checks the result by rebuilding before anything is written.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.export.modules import (
    as_json,
    describe_module,
    is_plain,
    plain_attributes,
    same_structure,
)
from compactml.export.transforms import apply_transform, config_of, description, find_module

_MISSING = object()


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
    want, have = config_of(module), config_of(current)
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


def _replacement(name: str, module: nn.Module, current: nn.Module | None) -> dict[str, Any]:
    """The transform putting ``module`` where ``current`` is: a ``convert`` recording only the
    arguments that differ when ``module``'s arguments include all of ``current``'s."""
    spec = describe_module(name, module)
    base = description(current)
    if base is None or not set(base) <= set(spec["args"]):
        return {"op": "replace", "module": name, "spec": spec}
    args = {
        key: value
        for key, value in spec["args"].items()
        if key not in base or as_json(base[key]) != as_json(value)
    }
    return {"op": "convert", "module": name, "spec": {"type": spec["type"], "args": args}}


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
            op = _replacement(name, module, current)
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
