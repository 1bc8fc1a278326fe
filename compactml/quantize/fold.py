"""Per-input-channel scales that leave a float model's outputs unchanged: where they can fold.

AWQ (Lin et al. 2023) and SmoothQuant (Xiao et al. 2022) both rewrite a linear layer as
``y = (x / s) (W * s)^T``: column ``j`` of the weight is multiplied by ``s_j`` and the input
divided by ``s_j``. In float the product is the same; what changes is which of the two factors
carries the large values when one of them is quantized. The weight side is easy (scale the
columns); the input side needs an operation that produces ``x`` and can absorb ``1 / s``:

- ``"norm"``: an elementwise-affine norm over the last dimension (``nn.LayerNorm``,
  ``nn.RMSNorm``, Hugging Face's ``LlamaRMSNorm``...) computes ``normalize(x) * w + b``, so
  dividing ``w`` and ``b`` by ``s`` divides its output by ``s``;
- ``"linear"``: an ``nn.Linear`` whose rows (and bias) are divided by ``s``;
- ``"explicit"``: anything else (a residual stream, an attention output, a model input): each
  layer is wrapped in :class:`ScaledInput`, which multiplies its input by the stored ``1 / s``
  (one ``Mul`` in ONNX) before the layer.

Folding into a producer changes every reader of its output, so it is done only when the
output is read by exactly the layers being scaled, each of them once, and by nothing else:
not a residual add, not a view, not the block's output. Those facts come from one traced call
of the block (:func:`input_groups`, using :func:`compactml.quantize.dataflow.trace_dataflow`);
a norm is also checked numerically (scaling its weight must scale its output channel by
channel), so a norm computing ``x * (1 + w)`` (Gemma) or normalizing over groups is never
folded into. Layers that read the same tensor share one group, because they must share
one ``s``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compactml.config import replace_module
from compactml.errors import CompactMLError
from compactml.quantize.dataflow import Dataflow, trace_dataflow

KINDS = ("norm", "linear", "explicit")


@dataclass(frozen=True)
class InputGroup:
    """Layers that read one same tensor, and where scales of their input fold.

    ``layers``: full names of the linear layers; ``producer``: full name of the module whose
    output they read when the scales fold into it (None for ``"explicit"``); ``kind``:
    ``"norm"``, ``"linear"`` or ``"explicit"`` (see the module docstring)."""

    layers: tuple[str, ...]
    producer: str | None
    kind: str


class ScaledInput(nn.Module):
    """``inner(x * inv_scale)``: a layer whose input scales (``1 / s``, one per input channel)
    could not be folded into the operation producing its input. Exported to ONNX as a ``Mul``
    before the inner layer; saved in a ``.cml`` with the inner layer's own description."""

    def __init__(self, inner: nn.Module, inv_scale: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("inv_scale", inv_scale.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inner layer on the scaled input."""
        return self.inner(x * self.inv_scale.to(x.dtype))

    def compactml_spec(self) -> dict[str, Any]:
        """The inner module's description (as the artifact writes modules) and the width."""
        from compactml.export.modules import describe_module  # the artifact's module table

        return {"inner": describe_module("inner", self.inner), "features": len(self.inv_scale)}

    @classmethod
    def from_compactml_spec(cls, args: dict[str, Any]) -> ScaledInput:
        """An empty wrapper (its scales and the inner weights are filled by load_state_dict)."""
        from compactml.export.modules import build_module

        return cls(build_module(args["inner"]), torch.ones(int(args["features"])))

    def extra_repr(self) -> str:
        """The number of input channels scaled."""
        return f"features={len(self.inv_scale)}"


def linear_name(model: nn.Module, name: str) -> str:
    """The name of the module that holds layer ``name``'s weight: ``name`` itself, or
    ``name + ".inner"`` once an explicit fold wrapped it in a :class:`ScaledInput`. Quantize
    the module at this name after folding."""
    module = model.get_submodule(name)
    return f"{name}.inner" if isinstance(module, ScaledInput) else name


# ------------------------------------------------------------------------------------------
# Finding the groups


class _Stop(Exception):
    """Ends the traced run once its outermost module call has returned."""


class _FirstCall:
    """Hooks on every module of the model that stop ``run()`` after the first outermost module
    call returns (one block call, or one model call), keeping its output, and keep the first
    input of every norm-like module (for the numerical check of :func:`_scales_channels`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.outer: nn.Module | None = None
        self.output: Any = None
        self.norm_inputs: dict[int, tuple[tuple, dict]] = {}

    def run(self, run: Callable[[], None]) -> Any:
        """Call ``run()`` until the first outermost call returns; that call's output."""
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            handles.append(module.register_forward_hook(self._post))
        try:
            run()
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return self.output

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.outer is None:
            self.outer = module
        if _norm_like(module) and id(module) not in self.norm_inputs:
            self.norm_inputs[id(module)] = (args, kwargs)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module is self.outer:
            self.output = output
            raise _Stop


class _Runner:
    """What :func:`trace_dataflow` calls as ``task.run(model, example)``: the caller's
    ``run()``, stopped after one outermost call (so one block call is traced, not every
    calibration call: the traced tensors are all kept alive until the trace ends)."""

    def __init__(self, first: _FirstCall, run: Callable[[], None]) -> None:
        self.first, self.call = first, run

    def run(self, model: nn.Module, example: Any) -> Any:
        return self.first.run(self.call)


def _norm_like(module: nn.Module) -> bool:
    """Structurally an elementwise-affine norm over the last dimension: ``nn.LayerNorm`` with
    an affine weight, ``nn.RMSNorm``, or a class named ``*LayerNorm``/``*RMSNorm``, holding a
    1-D weight (checked numerically by :func:`_scales_channels` before folding)."""
    named = type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    if not (isinstance(module, nn.LayerNorm | nn.RMSNorm) or named):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 1


def _scales_channels(module: nn.Module, call: tuple[tuple, dict] | None) -> bool:
    """Whether multiplying the norm's weight (and bias) by a positive vector ``r`` multiplies
    its output by ``r`` on the recorded input: what folding ``1 / s`` into it relies on. An
    input that makes the output non-finite shows nothing, so the answer is then False."""
    if call is None:
        return False
    args, kwargs = call
    weight, bias = module.weight, getattr(module, "bias", None)
    gen = torch.Generator().manual_seed(0)
    r = (torch.rand(weight.shape, generator=gen) + 0.5).to(weight.device, weight.dtype)
    with torch.no_grad():
        out = module(*args, **kwargs)
        try:
            module.weight = nn.Parameter(weight * r, weight.requires_grad)
            if isinstance(bias, nn.Parameter):
                module.bias = nn.Parameter(bias * r, bias.requires_grad)
            scaled = module(*args, **kwargs)
        finally:
            module.weight = weight
            if isinstance(bias, nn.Parameter):
                module.bias = bias
    if not isinstance(out, torch.Tensor) or not isinstance(scaled, torch.Tensor):
        return False
    if scaled.shape != out.shape:
        return False
    want = out.float() * r.float()
    if not bool(torch.isfinite(want).all() and torch.isfinite(scaled).all()):
        return False  # NaN/Inf outputs prove nothing: not foldable
    return torch.allclose(
        scaled.float(), want, rtol=1e-3, atol=1e-5 * float(want.abs().max().clamp(min=1.0))
    )


def _producer(
    flow: Dataflow,
    tensor: int,
    group: list[str],
    selected: set[str],
    width: int,
    modules: dict[str, nn.Module],
    first: _FirstCall,
) -> tuple[str | None, str]:
    """``(producer, kind)`` for the group reading ``tensor``: its producer when folding into it
    is safe (see the module docstring), else ``(None, "explicit")``."""
    explicit = (None, "explicit")
    node = flow.producer.get(tensor)
    if node is None or node.module is None or flow.calls.get(node.name) != 1:
        return explicit
    readers = flow.consumers.get(tensor, [])
    if tensor in flow.model_outputs or node.outputs != [tensor]:
        return explicit
    if sorted(r.name for r in readers) != sorted(group):
        return explicit  # another op or layer reads it (a residual add, a view)
    if any(flow.calls.get(name) != 1 for name in group):
        return explicit  # a layer called twice may read something else the second time
    module = node.module
    if type(module) is nn.Linear and node.name not in selected:
        if module.out_features == width and _own_parameters(module, modules):
            return node.name, "linear"
        return explicit
    if _norm_like(module) and module.weight.shape == (width,):
        if _own_parameters(module, modules) and _scales_channels(
            module, first.norm_inputs.get(id(module))
        ):
            return node.name, "norm"
    return explicit


def _own_parameters(module: nn.Module, modules: dict[str, nn.Module]) -> bool:
    """Whether no other module of the model shares ``module``'s parameters (tied weights
    would carry the fold into a module that does not expect it)."""
    mine = {id(p) for p in module.parameters(recurse=False)}
    return not any(
        id(p) in mine
        for other in modules.values()
        if other is not module
        for p in other.parameters(recurse=False)
    )


def input_groups(
    model: nn.Module, layers: dict[str, nn.Module], run: Callable[[], None]
) -> list[InputGroup]:
    """Group ``layers`` (full name in ``model`` -> a leaf linear layer) by the tensor they read
    and decide where each group's input scales fold (see the module docstring).

    ``run()`` runs ``model`` or one of its submodules (a block) on calibration input; it is
    traced once, up to the end of its first outermost module call (``Block.forward`` of the
    block runner runs every calibration call of a block: only the first one is traced). Every
    layer is in exactly one group, in the order the layers first run; a layer that never ran
    is a group of its own (``"explicit"``).
    """
    names = {id(module): name for name, module in layers.items()}
    first = _FirstCall(model)
    flow = trace_dataflow(model, None, _Runner(first, run))  # type: ignore[arg-type]
    modules = dict(model.named_modules())
    by_tensor: dict[int, list[str]] = {}  # the tensor a layer read on its first call
    ran: set[str] = set()
    for node in flow.nodes:
        name = names.get(id(node.module)) if node.module is not None else None
        if name is not None and name not in ran and node.inputs:
            by_tensor.setdefault(node.inputs[0], []).append(name)
            ran.add(name)
    groups = []
    for tensor, group in by_tensor.items():
        width = _width(layers[group[0]])
        producer, kind = _producer(flow, tensor, group, set(layers), width, modules, first)
        groups.append(InputGroup(tuple(group), producer, kind))
    groups += [InputGroup((name,), None, "explicit") for name in layers if name not in ran]
    return groups


def _width(layer: nn.Module) -> int:
    """Input channels of a linear layer (``in_features``, or its weight's column count)."""
    width = getattr(layer, "in_features", None)
    return int(width) if width is not None else int(layer.weight.shape[-1])


# ------------------------------------------------------------------------------------------
# Folding


def _linear_at(model: nn.Module, name: str) -> nn.Linear:
    """The float ``nn.Linear`` called ``name`` (possibly wrapped in a ScaledInput already)."""
    layer = model.get_submodule(linear_name(model, name))
    if type(layer) is not nn.Linear:
        raise CompactMLError(
            f"cannot fold input scales into {name or 'the model'} ({type(layer).__name__}): "
            "only float nn.Linear layers can take them; fold the scales before quantizing"
        )
    return layer


def _scaled(param: torch.Tensor, factor: torch.Tensor) -> nn.Parameter:
    """A new Parameter ``param * factor`` (a new tensor: a tied copy elsewhere is untouched)."""
    factor = factor.to(param.device, param.dtype)
    return nn.Parameter(param.detach() * factor, param.requires_grad)


def _check_scales(scales: Any, width: int, name: str) -> torch.Tensor:
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (width,):
        shape = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise CompactMLError(
            f"input scales for {name} must be a tensor of {width} values (one per input "
            f"channel), got {shape}"
        )
    s = scales.detach().float()
    if not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise CompactMLError(f"input scales for {name} must be finite and positive")
    if not bool(torch.isfinite(1.0 / s).all()):
        raise CompactMLError(f"input scales for {name} are too small to invert in float32")
    return s


def _check_producer(model: nn.Module, group: InputGroup, width: int) -> nn.Module | None:
    if group.kind not in KINDS:
        raise CompactMLError(f"unknown input group kind {group.kind!r}; use one of {KINDS}")
    if group.kind == "explicit":
        if "" in group.layers:
            raise CompactMLError(
                "cannot wrap the model itself in an explicit input scale in place; put the "
                "layer inside a container module (e.g. nn.Sequential(layer))"
            )
        return None
    if group.producer is None:
        raise CompactMLError(f"a {group.kind!r} input group needs a producer module name")
    producer = model.get_submodule(group.producer)
    if group.kind == "linear":
        ok = type(producer) is nn.Linear and producer.out_features == width
    else:
        ok = _norm_like(producer) and producer.weight.shape == (width,)
    if not ok:
        raise CompactMLError(
            f"{group.producer} ({type(producer).__name__}) cannot take the input scales of "
            f"{', '.join(group.layers)} as a {group.kind!r} producer of width {width}"
        )
    return producer


def fold_input_scale(model: nn.Module, group: InputGroup, scales: torch.Tensor) -> None:
    """Scale the inputs of ``group``'s layers by ``1 / scales`` and their weight columns by
    ``scales``, in place: the float model computes the same outputs (up to rounding).

    ``"norm"``: the producer's weight and bias are divided by ``scales``; ``"linear"``: its rows
    and bias; ``"explicit"``: each layer is wrapped in a :class:`ScaledInput` (or, if it already
    is, the wrapper's scale is updated). Every tensor changed is replaced by a new one, so a
    weight tied to another module is not changed through it. Checks everything before changing
    anything; raises CompactMLError for scales that are not finite and positive, of the wrong
    length, or layers that are not float ``nn.Linear``.
    """
    if not isinstance(group, InputGroup) or not group.layers:
        raise CompactMLError("fold_input_scale needs an InputGroup with at least one layer")
    linears = [_linear_at(model, name) for name in group.layers]
    width = linears[0].in_features
    if any(layer.in_features != width for layer in linears):
        raise CompactMLError(
            f"the layers {', '.join(group.layers)} read inputs of different widths; they "
            "cannot share input scales"
        )
    s = _check_scales(scales, width, ", ".join(group.layers) or "the model")
    producer = _check_producer(model, group, width)
    inv = 1.0 / s
    updates = [(layer, "weight", _scaled(layer.weight, s.reshape(1, -1))) for layer in linears]
    if producer is not None:
        rows = inv.reshape(-1, 1) if group.kind == "linear" else inv
        updates.append((producer, "weight", _scaled(producer.weight, rows)))
        if getattr(producer, "bias", None) is not None:
            updates.append((producer, "bias", _scaled(producer.bias, inv)))
    if not all(bool(torch.isfinite(new).all()) for _, _, new in updates):
        raise CompactMLError(
            f"input scales for {', '.join(group.layers)} overflow the weights; use smaller scales"
        )
    for module, attr, new in updates:
        setattr(module, attr, new)
    if producer is not None:
        return
    for name, layer in zip(group.layers, linears, strict=True):
        wrapper = _wrapper(model, name)
        if wrapper is not None:
            wrapper.inv_scale = wrapper.inv_scale * inv.to(wrapper.inv_scale.device)
        else:
            replace_module(model, name, ScaledInput(layer, inv.to(layer.weight.device)))


def _wrapper(model: nn.Module, name: str) -> ScaledInput | None:
    """The ScaledInput that layer ``name`` is, or is the ``inner`` of, if any."""
    module = model.get_submodule(name)
    if isinstance(module, ScaledInput):
        return module
    parent, _, leaf = name.rpartition(".")
    outer = model.get_submodule(parent) if leaf == "inner" else None
    return outer if isinstance(outer, ScaledInput) else None
