"""Which module feeds which: one traced forward pass with module hooks and a torch function
mode.

Leaf modules (no children) are recorded through forward hooks; torch functions called outside
any leaf module (``x + y``, ``torch.cat``, ``x.flatten(1)`` in a container's ``forward``) are
recorded as ``op:`` nodes through :class:`torch.overrides.TorchFunctionMode`. Tensors are told
apart by identity (each one is kept alive for the pass, so ids are never reused). Calls that
return no tensor (``x.size()``, ``x.dim()``) are not consumers.

Functional ReLU-like ops (``torch.relu``, ``F.relu``, ``F.relu6``, ``x.clamp(min=0)``,
``F.hardtanh(x, 0, 6)``) are marked with :attr:`Node.act` (``"relu"`` or ``"relu6"``) so
that quantizer placement can treat them like ``nn.ReLU``/``nn.ReLU6`` modules.

Ops and modules that only move or select values (views, ``MaxPool``, ``Flatten``, ``Dropout`` in
eval mode, ``Identity``) are *pass-through*: their output holds values of their input, so a
quantizer on the input covers the output with the same scale (:meth:`Dataflow.source`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from compactml.task import Task, eval_mode

PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity)
PASS_OPS = frozenset(
    {"flatten", "reshape", "view", "contiguous", "squeeze", "unsqueeze", "permute", "transpose",
     "max_pool2d", "max_pool1d", "dropout", "__getitem__", "clone", "detach"}
)  # fmt: skip


@dataclass
class Node:
    """One call of a leaf module (``name`` is its module name) or one functional op
    (``op:<function>#<n>``, ``op`` its function name), with the ids of the tensors it read and
    returned; ``act`` is ``"relu"``/``"relu6"`` for a functional op computing that activation
    (see :func:`functional_activation`)."""

    name: str
    module: nn.Module | None
    inputs: list[int]
    outputs: list[int]
    passthrough: bool
    op: str = ""
    act: str | None = None


@dataclass
class Dataflow:
    """The traced graph: nodes in call order, each tensor's producer and its consumers."""

    nodes: list[Node] = field(default_factory=list)
    producer: dict[int, Node] = field(default_factory=dict)
    consumers: dict[int, list[Node]] = field(default_factory=dict)
    model_outputs: set[int] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)

    def key(self, tensor_id: int, new: bool = False) -> int:
        """A key for the tensor object ``tensor_id`` that changes each time the tensor is
        written in place (``nn.ReLU(inplace=True)`` returns its input object): ``new`` marks a
        write."""
        version = self.versions.get(tensor_id, -1) + (1 if new else 0)
        self.versions[tensor_id] = max(version, 0)
        return hash((tensor_id, max(version, 0)))

    def add(self, node: Node) -> None:
        """Record ``node`` (with raw tensor ids) as the producer of its outputs and a consumer
        of its inputs; its ids are replaced by versioned keys (see :meth:`key`)."""
        node.inputs = [self.key(t) for t in node.inputs]
        node.outputs = [self.key(t, new=True) for t in node.outputs]
        self.nodes.append(node)
        for t in dict.fromkeys(node.inputs):
            self.consumers.setdefault(t, []).append(node)
        for t in node.outputs:
            self.producer[t] = node
        if node.module is not None:
            self.calls[node.name] = self.calls.get(node.name, 0) + 1

    def module_node(self, name: str) -> Node | None:
        """The (first) call of the module called ``name``, or None if it never ran."""
        return next((n for n in self.nodes if n.name == name), None)

    def source(self, tensor: int) -> int:
        """The tensor whose values ``tensor`` holds, walking back through pass-through nodes."""
        node = self.producer.get(tensor)
        while node is not None and node.passthrough and node.inputs:
            tensor = node.inputs[0]
            node = self.producer.get(tensor)
        return tensor

    def only_consumer(self, tensor: int) -> Node | None:
        """The single node reading ``tensor`` (None if several, none, or a model output)."""
        readers = self.consumers.get(tensor, [])
        if len(readers) != 1 or tensor in self.model_outputs:
            return None
        return readers[0]


RELU_OPS = frozenset({"relu", "relu_"})
RELU6_OPS = frozenset({"relu6", "relu6_"})
CLAMP_OPS = frozenset({"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"})
HARDTANH_OPS = frozenset({"hardtanh", "hardtanh_"})
CONCAT_OPS = frozenset({"cat", "concat", "concatenate"})


def _arg(args: tuple, kwargs: dict, index: int, names: tuple[str, ...]) -> Any:
    if len(args) > index:
        return args[index]
    return next((kwargs[n] for n in names if n in kwargs), None)


def functional_activation(name: str, args: tuple, kwargs: dict) -> str | None:
    """``"relu"`` or ``"relu6"`` when the torch function ``name`` called with ``args`` and
    ``kwargs`` computes ``max(x, 0)`` or ``min(max(x, 0), 6)`` (``relu``, ``relu6``,
    ``clamp``/``clip`` with min 0 and no max or max 6, ``hardtanh(x, 0, 6)``); else None."""
    if name in RELU_OPS:
        return "relu"
    if name in RELU6_OPS:
        return "relu6"
    if name in CLAMP_OPS:
        lo = _arg(args, kwargs, 1, ("min",))
        hi = None if name.startswith("clamp_min") else _arg(args, kwargs, 2, ("max",))
    elif name in HARDTANH_OPS:
        lo = _arg(args, kwargs, 1, ("min_val",))
        hi = _arg(args, kwargs, 2, ("max_val",))
        hi = 1.0 if hi is None else hi
    else:
        return None
    numbers = all(
        v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in (lo, hi)
    )
    if not numbers or lo != 0:
        return None
    return "relu" if hi is None else "relu6" if hi == 6 else None


def _tensor_ids(values: Any, keep: list) -> list[int]:
    tensors = [t for t in tree_leaves(values) if isinstance(t, torch.Tensor)]
    keep.extend(tensors)
    return [id(t) for t in tensors]


class _OpRecorder(TorchFunctionMode):
    """Records torch functions called while no leaf module is running."""

    def __init__(self, flow: Dataflow, keep: list) -> None:
        super().__init__()
        self.flow, self.keep, self.depth, self.count = flow, keep, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        out = func(*args, **(kwargs or {}))
        if self.depth == 0:
            outputs = _tensor_ids(out, self.keep)
            if outputs:
                fname = getattr(func, "__name__", str(func))
                inputs = _tensor_ids((args, kwargs or {}), self.keep)
                act = functional_activation(fname, args, kwargs or {})
                name, passthrough = f"op:{fname}#{self.count}", fname in PASS_OPS
                node = Node(name, None, inputs, outputs, passthrough, fname, act)
                self.count += 1
                self.flow.add(node)
        return out


def trace_dataflow(model: nn.Module, example: Any, task: Task | None = None) -> Dataflow:
    """Run ``model`` once on ``example`` (through ``task.run`` when given) in eval mode and
    return its :class:`Dataflow`."""
    flow, keep = Dataflow(), []
    recorder = _OpRecorder(flow, keep)
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            continue

        def pre(m: nn.Module, args: tuple, name: str = name) -> None:
            recorder.depth += 1
            m._dataflow_inputs = _tensor_ids(args, keep)

        def post(m: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            recorder.depth -= 1
            inputs = m.__dict__.pop("_dataflow_inputs", [])
            passthrough = isinstance(m, PASS_MODULES)
            flow.add(Node(name, m, inputs, _tensor_ids(out, keep), passthrough))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with eval_mode(model), torch.no_grad(), recorder:
            out = task.run(model, example) if task is not None else model(example)
        flow.model_outputs = {flow.key(t) for t in _tensor_ids(out, keep)}
    finally:
        for handle in handles:
            handle.remove()
    return flow
