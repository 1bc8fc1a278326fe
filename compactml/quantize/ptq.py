"""Static INT8 post-training quantization: ``Static`` (integer weights, calibrated uint8
activations).

:meth:`Static.apply`, top to bottom:

1. copy the model and fold each BatchNorm2d into the Conv2d before it (``qat.fold_model``);
2. trace one forward pass (:func:`~compactml.quantize.dataflow.trace_dataflow`) and place the
   activation quantizers (:func:`plan_quantizers`) so that ONNX Runtime can run every Conv,
   MatMul, residual Add and Concat on integers: the input of each quantized layer, its output
   (after the ReLU that alone reads it, since ORT drops a ReLU before a zero-point-0 quantizer),
   the output of each ReLU fed by a functional op (a residual add), and the output of a max pool
   over a quantized tensor. Quantizers that see the same values (through views, flatten, max
   pool) share one observer and so one scale: there are no Q-DQ-Q-DQ chains with two scales.
   A model's own outputs (logits) stay float.

   A functional ReLU/ReLU6 (``torch.relu``, ``F.relu``, ``F.relu6``, ``clamp(min=0)``) after a
   quantized layer is treated like an ``nn.ReLU`` module, but it has no module to hold the
   quantizer of its output. When only quantized layers read that output, their
   ``input_quant`` is it (``Conv -> Relu -> Q``: ORT removes the Relu). Otherwise (it feeds a
   ``torch.cat``, an add, a mean) the layer's ``output_quant`` stands for it: observed on the
   layer's output clamped as the ReLU would (:class:`ClampedObserver`), so its zero point is 0
   and ``relu(fq(y)) == fq(y) == fq(relu(y))`` exactly; the traced ``Relu`` then follows a
   ``DequantizeLinear`` it cannot change, and
   :func:`compactml.export.onnx_static.drop_identity_activations` removes it.

   Concatenations (:func:`concat_groups`): a quantized ``torch.cat`` output and its quantized
   inputs share one observer and so one scale, so ORT's ``QLinearConcat`` copies codes instead
   of requantizing each input through a lookup table (measured on ORT 1.32, 2 threads, four
   64x112x112 uint8 inputs: 0.18 ms against 0.69 ms), and each branch is rounded once, on the
   output's grid, instead of twice;
3. replace each selected Linear/Conv2d by a QuantLinear/QuantConv2d with symmetric integer
   weights (per output channel or per tensor, float16 scales);
4. calibrate: run ``task.calib`` once through the model (quantized weights, float activations)
   while every observer (:mod:`compactml.quantize.observers`) records its tensor;
5. attach the quantizers: ``input_quant``/``output_quant`` of the layers, and
   :class:`~compactml.quantize.modules.QuantOutput` around activations and pools.

The PyTorch model returned is the accuracy reference: activations are fake-quantized with the
exact ``QuantizeLinear`` arithmetic, weights are the integer codes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from compactml.config import Technique, record, replace_module
from compactml.errors import CompactMLError
from compactml.quantize import affine
from compactml.quantize.act import ActQuant
from compactml.quantize.affine import PerChannel, PerTensor, QScheme
from compactml.quantize.calibration import QuantPoint, calibrate, point_qparams
from compactml.quantize.dataflow import CONCAT_OPS, Dataflow, trace_dataflow
from compactml.quantize.modules import QuantConv2d, QuantLinear, QuantOutput
from compactml.quantize.observers import OBSERVERS, Observer, PercentileObserver, make_observer
from compactml.quantize.qat import fold_model
from compactml.quantize.swap import build_layers, check_some_built, warn_skipped
from compactml.task import Task

STATIC_TYPES = (nn.Linear, nn.Conv2d)
ACTIVATIONS = (nn.ReLU, nn.ReLU6)
POOLS = (nn.MaxPool1d, nn.MaxPool2d)
#: The range a functional activation (``Node.act``) leaves its input in.
FUNCTIONAL_RANGES: dict[str, tuple[float, float | None]] = {
    "relu": (0.0, None),
    "relu6": (0.0, 6.0),
}
ACT_BITS = 8  # uint8 activations: what ONNX Runtime's fast U8S8 kernels take


@dataclasses.dataclass
class QuantPlan:
    """Where the activation quantizers go: ``points`` keyed by the tensor they quantize;
    ``clamps[key] = (lo, hi)`` for a point observed *before* the functional ReLU/ReLU6 whose
    output it stands for (its observer sees the values clamped as the activation would);
    ``shared[key] = root`` for points that must share ``root``'s scale (concatenations)."""

    points: dict[object, QuantPoint]
    clamps: dict[object, tuple[float, float | None]]
    shared: dict[object, object]


def plan_quantizers(flow: Dataflow, layers: set[str]) -> QuantPlan:
    """The activation quantizers for the quantized ``layers`` (module names) of a traced
    model (see the module docstring for the rules)."""
    points: dict[object, QuantPoint] = {}
    clamps: dict[object, tuple[float, float | None]] = {}

    def use(key: object, module: str, side: str, role: str, user: str) -> None:
        points.setdefault(key, QuantPoint(module, side)).uses.append((user, role))

    wrapped: set[str] = set()
    for node in flow.nodes:
        if node.module is None or not node.inputs or not node.outputs:
            continue
        name, once = node.name, flow.calls[node.name] == 1
        if name in layers:
            key = flow.source(node.inputs[0]) if once else ("input", name)
            pool = flow.producer.get(key)
            if key not in points and pool is not None and _avg_pool(flow, pool):
                use(key, pool.name, "output", "wrap", pool.name)  # QLinear(Global)AveragePool
            use(key, name, "input", "input_quant", name)
            out = node.outputs[0]
            if out in flow.model_outputs:
                continue  # logits stay float
            reader = _reader(flow, out)
            if once and reader is not None and _single_activation(flow, reader):
                use(reader.outputs[0], reader.name, "output", "wrap", reader.name)
                wrapped.add(reader.name)
            elif once and reader is not None and _functional_activation(flow, reader):
                act = reader.outputs[0]  # no module computes it: the layer quantizes for it,
                if not _read_by_layers(flow, act, layers):  # unless the readers' inputs do
                    use(act, name, "output", "output_quant", name)
                    clamps[act] = FUNCTIONAL_RANGES[reader.act]
            else:
                use(out if once else ("output", name), name, "output", "output_quant", name)
        elif name in wrapped or not once:
            continue
        elif isinstance(node.module, ACTIVATIONS):
            producer = flow.producer.get(node.inputs[0])
            if producer is not None and producer.module is None and not producer.passthrough:
                use(node.outputs[0], name, "output", "wrap", name)
        elif isinstance(node.module, POOLS) and flow.source(node.inputs[0]) in points:
            use(flow.source(node.inputs[0]), "", "", "wrap", name)  # joins the existing point
    return QuantPlan(points, clamps, concat_groups(flow, points))


def concat_groups(flow: Dataflow, points: dict[object, QuantPoint]) -> dict[object, object]:
    """``{key: root}``: each quantized concatenation output and its quantized inputs share one
    scale (the root's), so ONNX Runtime's QLinearConcat copies codes without requantizing.
    Groups are merged across concatenations (union-find), e.g. DenseNet's growing features."""
    parent: dict[object, object] = {}

    def root(key: object) -> object:
        while parent.get(key, key) != key:
            key = parent[key]
        return key

    for node in flow.nodes:
        if node.module is not None or node.op not in CONCAT_OPS or not node.outputs:
            continue
        out = node.outputs[0]
        if out not in points:
            continue
        for tensor in node.inputs:
            key = flow.source(tensor)
            if key in points and root(key) != root(out):
                parent[root(key)] = root(out)
    return {key: root(key) for key in points if root(key) != key}


def _reader(flow: Dataflow, tensor: object) -> object:
    """The only node reading ``tensor``, looking through Identity/Dropout modules (a folded
    BatchNorm is an Identity between a conv and its ReLU); None when it has several."""
    reader = flow.only_consumer(tensor)
    while reader is not None and isinstance(reader.module, (nn.Identity, nn.Dropout)):
        if flow.calls[reader.name] != 1 or not reader.outputs:
            return None
        reader = flow.only_consumer(reader.outputs[0])
    return reader


def _avg_pool(flow: Dataflow, node: object) -> bool:
    """An average pool (global, or with a fixed window) called once."""
    module = node.module
    if flow.calls.get(node.name) != 1:
        return False
    if type(module) is nn.AdaptiveAvgPool2d:
        return module.output_size in (1, (1, 1))
    return type(module) is nn.AvgPool2d


def _single_activation(flow: Dataflow, node: object) -> bool:
    return isinstance(node.module, ACTIVATIONS) and flow.calls[node.name] == 1


def _functional_activation(flow: Dataflow, node: object) -> bool:
    """A functional ReLU/ReLU6 (``F.relu``, ``torch.relu``...) whose output is not a model
    output."""
    return (
        node.module is None and node.act is not None and node.outputs[0] not in (flow.model_outputs)
    )


def _read_by_layers(flow: Dataflow, tensor: object, layers: set[str]) -> bool:
    """Whether every reader of ``tensor`` is a quantized layer called once (their
    ``input_quant`` then quantizes it right after the op that made it)."""
    readers = flow.consumers.get(tensor, [])
    return bool(readers) and all(r.name in layers and flow.calls[r.name] == 1 for r in readers)


class ClampedObserver(Observer):
    """Feeds ``inner`` the observed values clamped to ``[lo, hi]`` (``hi`` None: no upper
    bound): the range of a functional ReLU/ReLU6 observed at the layer before it."""

    def __init__(self, inner: Observer, lo: float, hi: float | None) -> None:
        self.inner, self.lo, self.hi = inner, lo, hi

    def observe(self, x: torch.Tensor) -> None:  # noqa: D102
        self.inner.observe(x.clamp(min=self.lo, max=self.hi))

    def clip_range(self, bits: int = 8, signed: bool = False) -> tuple[float, float]:  # noqa: D102
        return self.inner.clip_range(bits, signed)

    @property
    def seen(self) -> bool:  # noqa: D102
        return self.inner.seen


def plan_observers(plan: QuantPlan, make: Callable[[], Observer]) -> dict[object, Observer]:
    """One observer per point; points sharing a scale (``plan.shared``) feed one observer, and
    a clamped point (``plan.clamps``) feeds it through a :class:`ClampedObserver`."""
    base: dict[object, Observer] = {}
    observers = {}
    for key in plan.points:
        inner = base.setdefault(plan.shared.get(key, key), make())
        clamp = plan.clamps.get(key)
        observers[key] = inner if clamp is None else ClampedObserver(inner, *clamp)
    return observers


def attach(model: nn.Module, points: dict[object, QuantPoint], qparams: dict) -> list[str]:
    """Put an ``ActQuant`` with each point's ``qparams[key] = (scale, zero_point)`` at every
    use; returns the names of the wrapped modules."""
    wrapped = []
    for key, point in points.items():
        scale, zero = qparams[key]
        for name, role in point.uses:
            module = model.get_submodule(name)
            quant = ActQuant(ACT_BITS, False, scale, zero)
            if role == "wrap":
                replace_module(model, name, QuantOutput(module, quant))
                wrapped.append(name)
            else:
                setattr(module, role, quant)
    return wrapped


@dataclasses.dataclass(frozen=True)
class Static(Technique):
    """Static post-training quantization: integer weights and uint8 activations whose scales
    are calibrated once on ``task.calib`` (Jacob et al. 2018, "Quantization and Training of
    Neural Networks for Efficient Integer-Arithmetic-Only Inference"), laid out for ONNX
    Runtime's QDQ integer kernels (see the module docstring).

    Args:
        bits: weight bits (2 to 8; symmetric codes, float16 scales). Activations are uint8.
        observer: how activation ranges are chosen: ``minmax``, ``percentile``, ``mse`` or
            ``entropy`` (see :mod:`compactml.quantize.observers`).
        percentile: the percentile kept by the ``percentile`` observer (both tails); checked
            whichever observer is chosen.
        per_channel: one weight scale per output channel (else one per tensor).
        calib_batches: batches of ``task.calib`` to calibrate on (None: all of them).
        progress: show a progress bar over the calibration batches.
        include, exclude: fnmatch patterns on module names (Linear and Conv2d are quantized).

    Layers whose weight cannot be quantized (not finite, too large for float16 scales, a shape
    the granularity cannot split) stay in float and are named in a warning and in the model's
    history. A layer that runs on the example input but that the calibration batches never
    reach is an error naming it.
    """

    family = "quantize"
    level = "bits"
    bits: int = 8
    observer: str = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    calib_batches: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scheme()  # validates bits
        if self.observer not in OBSERVERS:
            raise CompactMLError(
                f"unknown observer {self.observer!r}; use one of {', '.join(OBSERVERS)}"
            )
        PercentileObserver(self.percentile)  # validates percentile, whichever observer is used
        batches = self.calib_batches
        if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)):
            raise CompactMLError(f"calib_batches must be an integer or None, got {batches!r}")
        if batches is not None and batches < 1:
            raise CompactMLError(f"calib_batches must be at least 1, got {batches}")
        for name in ("per_channel", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise CompactMLError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def scheme(self) -> QScheme:
        """The weight :class:`QScheme`: symmetric, per output channel or per tensor."""
        return QScheme(self.bits, True, PerChannel(0) if self.per_channel else PerTensor())

    def make_observer(self) -> Observer:
        """A new activation observer as configured."""
        kwargs = {"percentile": self.percentile} if self.observer == "percentile" else {}
        return make_observer(self.observer, **kwargs)

    def _layers(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        names, skipped = [], {}
        for name, module in self.targets(model, STATIC_TYPES):
            try:
                affine.param_shape(tuple(module.weight.shape), self.scheme().granularity)
            except CompactMLError as exc:
                skipped[name] = str(exc)
                continue
            names.append(name)
        if not names:
            raise CompactMLError(
                f"Static found no Linear or Conv2d layer selected by include={list(self.include)}"
                f" exclude={list(self.exclude)}; check the patterns against the module names"
            )
        return names, skipped

    def _quantized_layer(self, module: nn.Module) -> nn.Module:
        cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
        return cls.from_float(module, self.scheme())

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A statically quantized copy of ``model`` (eval mode), calibrated on ``task.calib``."""
        if not isinstance(task, Task) or not task.has("calib"):
            raise CompactMLError(
                "Static needs calibration data; pass quantize(model, Static(), task) with "
                "Task(calib=[batches...])"
            )
        if type(model) in STATIC_TYPES:
            raise CompactMLError(
                "Static quantizes layers inside a model; wrap a single layer in nn.Sequential"
            )
        new = self.copy_model(model).eval()
        names, skipped = self._layers(new)
        convs = {n for n in names if isinstance(new.get_submodule(n), nn.Conv2d)}
        folded = fold_model(new, convs, task)
        flow = trace_dataflow(new, task.example_input(), task)
        for name in [n for n in names if n not in flow.calls]:
            skipped[name] = "never called in the forward pass"
            names.remove(name)
        built, failed = build_layers(
            [(n, new.get_submodule(n)) for n in names], self._quantized_layer
        )
        check_some_built(built, failed)
        skipped.update(failed)
        names = list(built)
        plan = plan_quantizers(flow, set(names))
        points = plan.points
        for name, layer in built.items():
            replace_module(new, name, layer)
        observers = plan_observers(plan, self.make_observer)
        calibrate(new, points, observers, task, self.calib_batches, self.progress)
        qparams = point_qparams(points, observers, ACT_BITS, False)
        warn_skipped(self, skipped)
        wrapped = attach(new, points, qparams)
        kept = [n for n, m in new.named_modules() if type(m) in STATIC_TYPES]
        details = {
            "activation_quantizers": sum(len(p.uses) for p in points.values()),
            "activation_scales": len(points),
            "float_layers": kept,
        }
        record(new, self, names + folded + wrapped, skipped, details)
        return new.eval()
