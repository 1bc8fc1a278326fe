"""One forward pass that follows every channel: the tracer behind ``Graph``.

The model runs once on an example input in eval mode. Layers with a handler
(:mod:`compactml.prune.handlers`) are seen through forward hooks: each gets slots for its
channel dims, ties its input slots to the channels of the tensor it reads, and gives its output
a channel map. Everything between layers (``x + y``, ``torch.cat``, ``x.flatten(1)``, the head
reshapes of an attention block, ``scaled_dot_product_attention``) is seen through a
:class:`torch.overrides.TorchFunctionMode` and follows the rules of
:mod:`compactml.prune.rules`. This works on eager models as they are, Hugging Face models
included, with no symbolic tracing: the price is that data-dependent control flow is followed
for the example input only.

Modules that are excluded (``include``/``exclude`` patterns) or whose channels cannot be pruned
(``handlers.OPAQUE``, grouped convolutions) are *opaque*: their inputs' channels are pinned and
their outputs carry none. An op outside the rule table that reads a traced channel stops the
trace with a CompactMLError naming the op and the module that called it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from compactml.errors import CompactMLError, first_line
from compactml.prune.handlers import handler_for, opaque_reason
from compactml.prune.rules import OPS, op_name, tensors
from compactml.prune.slots import ChannelMap, Slots
from compactml.task import Task, call_model, eval_mode

EXCLUDED = "excluded by the include/exclude patterns"


@dataclass
class Split:
    """A reshape in module ``owner``'s forward that cut one channel dim into several (the
    attention heads): ``ids[h]`` are the slots of head ``h``."""

    owner: str
    ids: torch.Tensor


class Tracer(TorchFunctionMode):
    """Channel bookkeeping for one traced forward pass (see the module docstring).

    After :func:`trace`: ``slots`` (the union-find), ``layers`` (``{name: {"in"|"out": slots}}``
    for every layer that ran), ``params`` (``{(module, attribute, axis): slots}`` for
    per-channel parameters used directly), ``splits`` and ``opaque`` (``{name: reason}``).
    """

    def __init__(self, model: nn.Module, selects: Callable[[str], bool]) -> None:
        super().__init__()
        self.model, self.selects = model, selects
        self.slots = Slots()
        self.maps: dict[int, tuple[torch.Tensor, ChannelMap]] = {}
        self.layers: dict[str, dict[str, torch.Tensor]] = {}
        self.params: dict[tuple[str, str, int], torch.Tensor] = {}
        self.splits: list[Split] = []
        self.opaque: dict[str, str] = {}
        self.stack: list[str] = []
        self.depth = 0
        self._func: Any = None
        self._owned = {
            id(t): (name, attr)
            for name, m in model.named_modules()
            for attr, t in itertools.chain(m._parameters.items(), m._buffers.items())
            if t is not None and handler_for(m) is None and (not name or selects(name))
        }

    # What the rules use.
    def map_of(self, t: Any) -> ChannelMap | None:
        """The channel map of tensor ``t`` (None when it carries no traced channel)."""
        entry = self.maps.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def set_map(self, t: torch.Tensor, cmap: ChannelMap | None) -> None:
        """Give ``t`` a channel map; positions labelled ``-1`` get fresh pinned slots."""
        if cmap is None:
            self.maps.pop(id(t), None)
            return
        ids = cmap.ids
        if bool((ids < 0).any()):
            ids = ids.clone()
            fresh = self.slots.new(int((ids < 0).sum()))
            self.slots.pin(fresh, "channels joined with an untraced tensor")
            ids[ids < 0] = fresh
        self.maps[id(t)] = (t, ChannelMap(cmap.dims, ids))

    def pin_all(self, ids: list[torch.Tensor], reason: str) -> None:
        """Pin every slot in ``ids``."""
        for part in ids:
            self.slots.pin(part, reason)

    def param_slots(self, t: torch.Tensor, axis: int) -> torch.Tensor | None:
        """Slots for axis ``axis`` of ``t`` when it is a parameter or buffer of a module
        without a handler (e.g. a LayerScale ``gamma``); None for any other tensor."""
        owner = self._owned.get(id(t))
        if owner is None:
            return None
        key = (*owner, axis % t.dim())
        if key not in self.params:
            self.params[key] = self.slots.new(t.shape[axis])
        return self.params[key]

    def owner(self) -> str:
        """The name of the innermost module running now ("" for the model itself)."""
        return self.stack[-1] if self.stack else ""

    def record_split(self, cmap: ChannelMap) -> None:
        """Remember a reshape that cut channels into heads (see :class:`Split`)."""
        self.splits.append(Split(self.owner(), cmap.ids))

    def replay(self, args: tuple, kwargs: dict) -> Any:
        """Call the function being followed on other arguments (label tensors)."""
        return self._func(*args, **kwargs)

    def unknown(self, name: str) -> CompactMLError:
        """The error for a torch function that reads traced channels and has no rule."""
        owner = self.owner()
        if not owner:
            return CompactMLError(
                f"structured pruning cannot follow channels through torch function {name!r} "
                "in the model's own forward; prune a submodule, or keep its layers with exclude="
            )
        kind = type(self.model.get_submodule(owner)).__name__
        return CompactMLError(
            f"structured pruning cannot follow channels through torch function {name!r} "
            f"called in module {owner!r} ({kind}); pass exclude=({owner!r},) to keep that "
            "module's channels as they are"
        )

    # Torch functions between layers.
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self._follow(func, args, kwargs, out)
        return out

    def _follow(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = op_name(func)
        if name == "__setitem__":
            cmap = self.map_of(args[0]) if args else None
            if cmap is not None:
                self.slots.pin(cmap.ids, "written in place by indexing")
            return
        if not tensors(out):
            return
        rule = OPS.get(name)
        if rule is None:
            if any(self.map_of(t) is not None for t in tensors((args, kwargs))):
                raise self.unknown(name)
            return
        self._func = func
        rule(self, name, args, kwargs, out)

    # Layers, through hooks.
    def layer(self, name: str, m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        """Tie a handled layer's input slots to the channels it reads; map its output."""
        handler = handler_for(m)
        own = self.layers.setdefault(
            name, {dim: self.slots.new(size) for dim, size in handler.sizes(m).items()}
        )
        x = next(iter(tensors((args, kwargs))), None)
        xmap = self.map_of(x) if x is not None else None
        axis = handler.in_axis(m, x.dim()) if x is not None else None
        target = own.get("in")
        if axis is None:
            if xmap is not None:
                self.slots.pin(xmap.ids, f"{name} reads these values as indices")
        elif xmap is not None and xmap.dims == (axis,):
            if target is not None:
                self.slots.unite(xmap.ids, target)
            else:
                self.slots.unite(xmap.ids[handler.coupling(m)], own["out"])
        else:
            if xmap is not None:
                self.slots.pin(xmap.ids, f"{name} reads these channels on another axis")
            self.slots.pin(
                target if target is not None else own["out"],
                f"the input channels of {name} come from the model input or a module left alone",
            )
        if isinstance(out, torch.Tensor):
            self.set_map(out, ChannelMap((handler.out_axis(m, out.dim()),), own["out"]))

    def opaque_call(self, name: str, reason: str, args: tuple, kwargs: dict) -> None:
        """Pin the channels an opaque module reads; its outputs carry none."""
        self.opaque[name] = reason
        for t in tensors((args, kwargs)):
            cmap = self.map_of(t)
            if cmap is not None:
                self.slots.pin(cmap.ids, f"read by {name} ({reason})")

    def install(self) -> list[Any]:
        """Register the hooks; returns their handles."""
        handles, leaves = [], []
        for name, m in self.model.named_modules():
            if any(name.startswith(f"{leaf}.") for leaf in leaves if leaf):
                continue
            reason = EXCLUDED if self._excluded(name, m) else opaque_reason(m)
            kind = "opaque" if reason else "layer" if handler_for(m) else "container"
            if kind != "container":
                leaves.append(name)
            handles.append(m.register_forward_pre_hook(self._pre(name, kind), with_kwargs=True))
            handles.append(
                m.register_forward_hook(self._post(name, kind, reason), with_kwargs=True)
            )
        return handles

    def _excluded(self, name: str, m: nn.Module) -> bool:
        """True for a module that is not selected and holds no selected module (a container
        of an included layer stays transparent)."""
        if not name or self.selects(name):
            return False
        return not any(self.selects(sub) for sub, _ in m.named_modules(prefix=name))

    def _pre(self, name: str, kind: str) -> Callable:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            self.stack.append(name)
            self.depth += kind != "container"

        return hook

    def _post(self, name: str, kind: str, reason: str | None) -> Callable:
        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            self.stack.pop()
            if kind == "container":
                return
            self.depth -= 1
            if kind == "layer":
                self.layer(name, m, args, kwargs, out)
            else:
                self.opaque_call(name, reason or EXCLUDED, args, kwargs)

        return hook


def trace(
    model: nn.Module, example: Any, selects: Callable[[str], bool], task: Task | None = None
) -> Tracer:
    """Run ``model`` once on ``example`` (through ``task.run`` when given), following channels.

    The model's outputs are pinned: their shape must not change.
    """
    tracer = Tracer(model, selects)
    handles = tracer.install()
    try:
        with eval_mode(model), torch.no_grad(), tracer:
            out = task.run(model, example) if task is not None else call_model(model, example)
    except CompactMLError:
        raise
    except Exception as exc:
        raise CompactMLError(
            f"cannot trace the model on the example input ({first_line(exc)}); check that "
            "the model runs on task.example_input()"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    for t in tensors(out):
        cmap = tracer.map_of(t)
        if cmap is not None:
            tracer.slots.pin(cmap.ids, "model output")
    return tracer
