"""Peak activation memory, from the lifetimes of the tensors in the model's traced graph.

The model is traced with ``torch.export.export(strict=False)`` (falling back to
``torch.fx.symbolic_trace`` with ``ShapeProp``). Walking the graph's nodes in execution order:

- each node's output occupies its bytes (shape x element size) from the step that creates it
  to the step of its last user; outputs of the graph stay alive to the end;
- a view or in-place op (its schema says the result aliases an input) adds no bytes, but
  keeps the tensor it aliases alive until the view's own last use; items taken out of a tuple
  output (``getitem``) alias the whole tuple;
- graph inputs (the example input) count; parameters, buffers and constants do not, since
  they live with the weights (flash on a microcontroller).

The peak is the largest sum of live bytes over all steps. It assumes no buffer is reused
in place by the runtime beyond what the graph itself says, so it is what a simple static
arena planner needs, and an upper bound for a smarter one.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils._pytree import tree_leaves

from compactml.errors import first_line
from compactml.task import call_model, tensor_nbytes

VIEW_NAMES = frozenset(
    "view view_as reshape flatten unflatten squeeze unsqueeze transpose permute t expand "
    "expand_as narrow chunk split unbind detach getitem __getitem__ contiguous".split()
)


@dataclass(frozen=True)
class Step:
    """One graph node for the liveness walk: output bytes, the node it aliases, its inputs."""

    name: str
    nbytes: int
    inputs: tuple[str, ...] = ()
    alias_of: str | None = None
    is_input: bool = False


@dataclass(frozen=True)
class ActivationMemory:
    """Peak live activation bytes (None if the model could not be traced, with ``note`` why).

    ``input_bytes`` are the graph inputs' bytes and ``activation_bytes`` the bytes of every
    tensor the graph creates (views excluded): what an inference writes, used by the energy
    estimate. ``method`` names the tracer used.
    """

    peak_bytes: int | None
    note: str | None
    input_bytes: int = 0
    activation_bytes: int = 0
    method: str | None = None


def peak_live_bytes(steps: list[Step]) -> int:
    """The most bytes alive at once when ``steps`` run in order (lifetimes as in the module doc)."""
    index = {step.name: i for i, step in enumerate(steps)}
    root: dict[str, str] = {}
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        root[step.name] = root.get(step.alias_of, step.alias_of) if step.alias_of else step.name
        last[root[step.name]] = max(last.get(root[step.name], i), i)
        for name in step.inputs:
            if name in root:
                last[root[name]] = max(last[root[name]], i)
    delta = [0] * (len(steps) + 1)
    for step in steps:
        if step.alias_of is None and step.nbytes:
            delta[index[step.name]] += step.nbytes
            delta[last[step.name] + 1] -= step.nbytes
    peak = live = 0
    for change in delta:
        live += change
        peak = max(peak, live)
    return peak


def _meta_bytes(meta: Any) -> int:
    """Bytes described by fx ShapeProp's ``tensor_meta``: a TensorMetadata or a nest of them.

    ``tensor_nbytes`` counts real (and fake) tensors; fx records only shapes and dtypes.
    """
    leaves = tree_leaves(meta, is_leaf=lambda leaf: isinstance(leaf, TensorMetadata))
    return sum(
        math.prod(int(size) for size in leaf.shape) * leaf.dtype.itemsize
        for leaf in leaves
        if isinstance(leaf, TensorMetadata)
    )


def _aliased_arg(node: fx.Node) -> fx.Node | None:
    """The input node that ``node``'s result aliases (a view or in-place op), if any."""
    target = node.target
    nodes = [arg for arg in node.args if isinstance(arg, fx.Node)]
    if target is operator.getitem:
        return nodes[0] if nodes else None
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    wanted = schema.returns[0].alias_info.before_set
    for argument, value in zip(schema.arguments, node.args, strict=False):
        info = argument.alias_info
        if isinstance(value, fx.Node) and info is not None and info.before_set == wanted:
            return value
    return nodes[0] if nodes else None


def _export_steps(model: nn.Module, args: tuple, kwargs: dict) -> list[Step]:
    program = torch.export.export(model, args, kwargs, strict=False)
    user_inputs = set(program.graph_signature.user_inputs)
    steps = []
    for node in program.graph.nodes:
        inputs = tuple(n.name for n in node.all_input_nodes)
        if node.op == "placeholder":
            nbytes = tensor_nbytes(node.meta.get("val")) if node.name in user_inputs else 0
            steps.append(Step(node.name, nbytes, is_input=node.name in user_inputs))
            continue
        alias = _aliased_arg(node) if node.op == "call_function" else None
        nbytes = 0 if node.op == "output" else tensor_nbytes(node.meta.get("val"))
        steps.append(Step(node.name, nbytes, inputs, alias.name if alias is not None else None))
    return steps


def _fx_alias(node: fx.Node, graph_module: fx.GraphModule) -> fx.Node | None:
    nodes = [arg for arg in node.args if isinstance(arg, fx.Node)]
    if not nodes:
        return None
    if node.op == "call_module":
        inplace = getattr(graph_module.get_submodule(str(node.target)), "inplace", False)
        return nodes[0] if inplace is True else None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in VIEW_NAMES or (name.endswith("_") and not name.startswith("_")):
        return nodes[0]
    return None


def _fx_steps(model: nn.Module, args: tuple, kwargs: dict) -> list[Step]:
    graph_module = fx.symbolic_trace(model)
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    values = list(args) + [
        kwargs[n.target] if n.target in kwargs else n.args[0] for n in placeholders[len(args) :]
    ]
    ShapeProp(graph_module).propagate(*values)
    steps = []
    for node in graph_module.graph.nodes:
        inputs = tuple(n.name for n in node.all_input_nodes)
        meta = node.meta.get("tensor_meta")
        if node.op == "placeholder":
            steps.append(Step(node.name, _meta_bytes(meta), is_input=True))
        elif node.op in ("get_attr", "output"):
            steps.append(Step(node.name, 0, inputs))
        else:
            alias = _fx_alias(node, graph_module)
            nbytes = _meta_bytes(meta)
            steps.append(Step(node.name, nbytes, inputs, alias.name if alias is not None else None))
    return steps


def _arguments(*args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """Hand back the call's arguments: the tracers take ``(args, kwargs)``, not a call."""
    return args, kwargs


def _reason(exc: Exception) -> str:
    """``Type: first line`` of a tracer's error (message cut at 160 characters)."""
    name = type(exc).__name__
    return f"{name}: {first_line(exc)[:160]}" if str(exc).strip() else name


def peak_activation(model: nn.Module, inputs: Any) -> ActivationMemory:
    """Trace ``model`` on ``inputs`` (in its current train/eval mode) and measure peak bytes.

    Returns ``peak_bytes=None`` with a note naming why when neither tracer can handle the model.
    """
    # call_model's dict/tuple rule, applied to a function that returns the arguments it got.
    args, kwargs = call_model(_arguments, inputs)
    failures = []
    for method, build in (("torch.export", _export_steps), ("torch.fx", _fx_steps)):
        try:
            steps = build(model, args, kwargs)
        except Exception as exc:  # tracers raise many types; the reason goes in the note
            failures.append(f"{method} failed ({_reason(exc)})")
            continue
        created = sum(s.nbytes for s in steps if s.alias_of is None and not s.is_input)
        note = None if method == "torch.export" else f"traced with torch.fx; {failures[0]}"
        return ActivationMemory(
            peak_bytes=peak_live_bytes(steps),
            note=note,
            input_bytes=sum(s.nbytes for s in steps if s.is_input),
            activation_bytes=created,
            method=method,
        )
    return ActivationMemory(None, "cannot trace the model: " + "; ".join(failures))
