"""``MixedPrecision``: weight-only quantization with a bit width chosen per layer for a budget.

Two steps, both inspectable (:func:`plan_mixed_precision` returns the plan without applying it):

1. **Sensitivity.** Each selected Linear/Conv2d/Embedding layer is quantized alone at each
   candidate bit width (the same round-to-nearest as :class:`WeightOnly`, through
   ``QuantLinear.from_float`` and friends) and the damage is measured with
   :func:`compactml.quantize.sensitivity.layer_sensitivity`: the headline metric drop on a few
   eval batches, or the relative output error on calibration batches.
2. **Choice.** The predicted loss of a plan is the *sum* of its layers' measured damages (an
   additivity assumption: the layers' errors are taken as independent, which holds for small
   perturbations and is the usual approximation of mixed-precision search, e.g. HAWQ, Dong et
   al. 2019). Damages are first made monotone (fewer bits never predicted to hurt less, and no
   layer predicted to improve the model). :func:`choose_bits` then solves the resulting
   multiple-choice knapsack exactly by dynamic programming.

Budgets:

- ``size``: the bytes of the saved ``.cml`` artifact (``len(artifact_bytes(model))``, unsigned;
  a signature adds about 200 bytes), everything included: the planned layers, layers left in
  float, biases, norms, the manifest. The bytes besides the planned layers are measured on
  uniformly quantized copies, and the applied model's artifact is measured again; if it is over
  (the manifest's numbers have a few more digits), the plan is re-solved with the excess taken
  off, so ``apply`` never returns a model whose artifact exceeds ``size``.
- ``avg_bits``: stored bits per weight (packed codes, float16 scales and zero points: 4-bit
  group-32 symmetric is 4.5 bits) averaged over the quantized layers' weights, weighted by
  element count; biases and layers left in float are not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from typing import Any

from torch import nn

from compactml.config import Technique, record
from compactml.errors import CompactMLError
from compactml.quantize.affine import MAX_BITS, MIN_BITS, Scheme
from compactml.quantize.modules import QUANT_MODULES
from compactml.quantize.qweight import QWeight
from compactml.quantize.sensitivity import choose_bits, layer_sensitivity
from compactml.quantize.swap import set_layer
from compactml.quantize.weight_only import LAYER_TYPES, WeightOnly
from compactml.sensitivity.measures import MEASURES, check_batches
from compactml.task import Task, tensor_nbytes

_UNITS = {"": 1, "b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20}
_UNITS |= {"gb": 2**30, "gib": 2**30}
_FIT_ATTEMPTS = 4


def parse_size(size: int | float | str) -> int:
    """Bytes from ``size``: a number of bytes, or a string such as ``"256KB"`` or ``"1.5 MB"``
    (KB = 1024 bytes, MB = 1024**2, GB = 1024**3; fractions round down)."""
    value: float | None = None
    if isinstance(size, int | float) and not isinstance(size, bool):
        value = float(size)
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", size)
        if match and match.group(2).lower() in _UNITS:
            value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value is None or not math.isfinite(value) or value < 1:
        raise CompactMLError(
            f"size={size!r} is not a size; give bytes as a positive number or a string such "
            "as '256KB' or '1.5MB'"
        )
    return int(value)


def _candidates(value: Any) -> tuple[int, ...]:
    """Candidate bit widths, most first, or a one-line error."""
    bits = (value,) if isinstance(value, int) else value
    ok = isinstance(bits, tuple | list) and bits
    if not ok or not all(type(b) is int and MIN_BITS <= b <= MAX_BITS for b in bits):
        raise CompactMLError(
            f"candidates must be bit widths from {MIN_BITS} to {MAX_BITS}, such as (8, 4, 2); "
            f"got {value!r}"
        )
    return tuple(sorted(set(bits), reverse=True))


@dataclasses.dataclass(frozen=True)
class MixedPrecision(Technique):
    """Weight-only quantization with bits chosen per layer to meet a budget with least loss.

    Args:
        candidates: bit widths to choose from (2 to 8).
        size: budget on the ``.cml`` artifact's bytes: a number or a string like ``"256KB"``.
        avg_bits: budget on stored bits per weight over the quantized layers (scales included).
            Give exactly one of ``size`` and ``avg_bits``.
        group_size, symmetric, clip: the quantization scheme, as in :class:`WeightOnly`.
        metric: how damage is measured: ``"auto"``, ``"metric"`` (headline metric drop on eval
            batches) or ``"output"`` (relative output error on calib batches); see
            :mod:`compactml.sensitivity.measures`.
        batches: batches per measurement (None: all).
        progress: show a progress bar while measuring.
        include, exclude: fnmatch patterns on module names.

    Layers the scheme cannot handle stay in float, are named in a warning and counted in the
    size. The chosen plan is recorded in ``compactml.config.history(model)`` (key ``"plan"``).
    """

    family = "quantize"
    candidates: tuple[int, ...] = (8, 4, 2)
    size: int | str | None = None
    avg_bits: float | None = None
    group_size: int | None = 32
    symmetric: bool = True
    clip: str = "none"
    metric: str = "auto"
    batches: int | None = 8
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "candidates", _candidates(self.candidates))
        for b in self.candidates:
            self.weight_only(b)  # validates group_size, symmetric and clip
        if (self.size is None) == (self.avg_bits is None):
            raise CompactMLError(
                "MixedPrecision needs exactly one budget: size (e.g. size='256KB') or "
                "avg_bits (e.g. avg_bits=4)"
            )
        if self.size is not None:
            parse_size(self.size)
        avg = self.avg_bits
        if avg is not None and (
            isinstance(avg, bool) or not isinstance(avg, int | float) or not 0 < avg < 64
        ):
            raise CompactMLError(f"avg_bits must be a positive number such as 4, got {avg!r}")
        if self.metric not in MEASURES:
            raise CompactMLError(f"metric={self.metric!r} is not supported; use one of {MEASURES}")
        check_batches(self.batches)
        if not isinstance(self.progress, bool):
            raise CompactMLError(f"progress must be true or false, got {self.progress!r}")

    def weight_only(self, bits: int) -> WeightOnly:
        """The uniform :class:`WeightOnly` config for one candidate ``bits``."""
        return WeightOnly(
            bits=bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            clip=self.clip,
            include=self.include,
            exclude=self.exclude,
        )

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A copy of ``model`` quantized per :func:`plan_mixed_precision` (needs ``task``)."""
        measured = _measure(model, task, self)
        if self.size is None:
            return _build(self, model, _solve(measured, self))
        limit = target = parse_size(self.size)
        for _ in range(_FIT_ATTEMPTS):
            new = _build(self, model, _solve(measured, self, target))
            excess = _artifact_size(new) - limit
            if excess <= 0:
                return new
            target -= excess
        raise CompactMLError(
            f"MixedPrecision could not fit the artifact in {limit} bytes after "
            f"{_FIT_ATTEMPTS} attempts; raise size by a few hundred bytes"
        )


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's choice: ``bits``, stored ``nbytes`` (weight, scales, zero points, bias),
    ``bits_per_weight`` (stored, scales included), measured ``damage`` at those bits, and the
    measured damage of every candidate (``options``: bits -> damage)."""

    name: str
    bits: int
    nbytes: int
    bits_per_weight: float
    damage: float
    options: dict[int, float]


@dataclasses.dataclass(frozen=True)
class Plan:
    """A mixed-precision plan: per-layer choices, layers left in float (``skipped``: name ->
    reason), what damage means (``measure``), the ``budget`` as text, the predicted artifact
    bytes (``predicted_bytes``, size budgets only), the stored ``avg_bits`` over the planned
    layers, and the ``predicted_loss`` (sum of the chosen layers' monotone damages)."""

    layers: tuple[LayerPlan, ...]
    skipped: dict[str, str]
    measure: str
    budget: str
    predicted_bytes: int | None
    avg_bits: float
    predicted_loss: float

    def bits(self) -> dict[str, int]:
        """Layer name -> chosen bits."""
        return {layer.name: layer.bits for layer in self.layers}

    def table(self) -> list[dict[str, Any]]:
        """One JSON-able row per layer: layer, bits, bytes, bits_per_weight, damage."""
        return [
            {
                "layer": layer.name,
                "bits": layer.bits,
                "bytes": layer.nbytes,
                "bits_per_weight": round(layer.bits_per_weight, 4),
                "damage": float(f"{layer.damage:.6g}") if math.isfinite(layer.damage) else None,
            }
            for layer in self.layers
        ]


@dataclasses.dataclass
class _Measured:
    """What planning needs: per layer and candidate, the damage and the exact costs."""

    damage: dict[str, dict[int, float]]
    layer_bytes: dict[str, dict[int, int]]
    weight_bits: dict[str, dict[int, int]]
    numel: dict[str, int]
    skipped: dict[str, str]
    measure: str
    overhead: int = 0  # artifact bytes besides the planned layers (size budgets)


def plan_mixed_precision(model: nn.Module, task: Task | None, config: MixedPrecision) -> Plan:
    """The plan ``config.apply(model, task)`` would follow, without building the model.

    For a size budget, the predicted bytes come from the measured overhead; ``apply`` checks
    the real artifact and tightens the plan if it is a few bytes over.
    """
    return _solve(_measure(model, task, config), config)


def _artifact_size(model: nn.Module) -> int:
    """Bytes of ``model``'s unsigned ``.cml`` artifact (imported here: the exporter imports
    the quantized modules, so a top-level import would be circular)."""
    from compactml.export.artifact import artifact_bytes

    return len(artifact_bytes(model))


def _quantize_layer(module: nn.Module, scheme: Scheme, clip: str) -> nn.Module:
    return QUANT_MODULES[type(module)].from_float(module, scheme, clip)


def _costs(module: nn.Module, scheme: Scheme) -> tuple[int, int]:
    """``(stored bytes of the quantized layer, stored bits of its weight)``, exact."""
    tensors = QWeight.empty_tensors(scheme, tuple(module.weight.shape))
    weight = tensor_nbytes([t for t in tensors.values() if t is not None])
    bias = getattr(module, "bias", None)
    return weight + (0 if bias is None else tensor_nbytes(bias)), 8 * weight


def _measure(model: nn.Module, task: Task | None, config: MixedPrecision) -> _Measured:
    """Sensitivity of every selected layer at every candidate, costs, and the size overhead."""
    chosen = config.targets(model, tuple(QUANT_MODULES))
    if not chosen:
        raise CompactMLError(
            f"MixedPrecision found no {LAYER_TYPES} layer selected by "
            f"include={list(config.include)} exclude={list(config.exclude)}; "
            "check the patterns against the model's module names"
        )
    schemes = {b: config.weight_only(b).scheme() for b in config.candidates}
    variants = {
        str(b): functools.partial(_quantize_layer, scheme=s, clip=config.clip)
        for b, s in schemes.items()
    }
    names = [name for name, _ in chosen]
    sens = layer_sensitivity(
        model,
        task,
        names,
        variants,
        measure=config.metric,
        batches=config.batches,
        progress=config.progress,
    )
    measured = _Measured({}, {}, {}, {}, {}, sens.measure)
    for name in names:
        if not sens.damage[name]:
            measured.skipped[name] = next(iter(sens.failed[name].values()))
            continue
        module = model.get_submodule(name)
        measured.damage[name] = {int(b): d for b, d in sens.damage[name].items()}
        costs = {b: _costs(module, schemes[b]) for b in measured.damage[name]}
        measured.layer_bytes[name] = {b: c[0] for b, c in costs.items()}
        measured.weight_bits[name] = {b: c[1] for b, c in costs.items()}
        measured.numel[name] = module.weight.numel()
    if not measured.damage:
        name, reason = next(iter(measured.skipped.items()))
        raise CompactMLError(f"no selected layer can be quantized; {name or 'model'}: {reason}")
    if measured.skipped:
        listed = "; ".join(f"{name}: {reason}" for name, reason in measured.skipped.items())
        warnings.warn(
            f"MixedPrecision kept {len(measured.skipped)} layer(s) in float: {listed}",
            stacklevel=3,
        )
    if config.size is not None:
        measured.overhead = _overhead(model, config, measured)
    return measured


def _overhead(model: nn.Module, config: MixedPrecision, measured: _Measured) -> int:
    """Artifact bytes besides the planned layers: the most over uniform plans, one per
    candidate (each layer at that candidate, or its nearest available one)."""
    overhead, text = 0, f"artifact <= {parse_size(config.size)} bytes"
    for bits in config.candidates:
        choice = {n: min(d, key=lambda b: abs(b - bits)) for n, d in measured.damage.items()}
        plan = _make_plan(measured, choice, text)
        layers = sum(layer.nbytes for layer in plan.layers)
        overhead = max(overhead, _artifact_size(_build(config, model, plan)) - layers)
    return overhead


def _monotone(damage: dict[int, float]) -> dict[int, float]:
    """Damages made non-negative and non-increasing in bits (fewer bits never hurt less)."""
    out, worst = {}, 0.0
    for bits in sorted(damage, reverse=True):
        value = damage[bits]
        worst = max(worst, math.inf if math.isnan(value) else value)
        out[bits] = worst
    return out


def _solve(measured: _Measured, config: MixedPrecision, size: int | None = None) -> Plan:
    """Choose bits for a size budget (artifact bytes; ``size`` overrides the config's) or for
    the config's ``avg_bits``."""
    if config.size is not None:
        limit = parse_size(config.size) if size is None else size
        costs, budget = measured.layer_bytes, limit - measured.overhead
        text = f"artifact <= {parse_size(config.size)} bytes"
    else:
        costs = measured.weight_bits
        budget = math.floor(config.avg_bits * sum(measured.numel.values()))
        text = f"avg_bits <= {config.avg_bits}"
    smallest = sum(min(c.values()) for c in costs.values())
    if smallest > budget:
        if config.size is not None:
            raise CompactMLError(
                f"size {config.size!r} is too small: the smallest artifact with every layer at "
                f"its fewest bits is {measured.overhead + smallest} bytes; raise size to at "
                "least that, add smaller candidates or quantize more layers"
            )
        floor = smallest / sum(measured.numel.values())
        raise CompactMLError(
            f"avg_bits={config.avg_bits} is too small: the fewest stored bits per weight with "
            f"these candidates and scales is {floor:.3f}; raise avg_bits to at least that"
        )
    losses = {name: _monotone(d) for name, d in measured.damage.items()}
    return _make_plan(measured, choose_bits(costs, losses, budget), text)


def _make_plan(measured: _Measured, choice: dict[str, int], budget: str) -> Plan:
    layers = tuple(
        LayerPlan(
            name=name,
            bits=bits,
            nbytes=measured.layer_bytes[name][bits],
            bits_per_weight=measured.weight_bits[name][bits] / measured.numel[name],
            damage=measured.damage[name][bits],
            options=dict(measured.damage[name]),
        )
        for name, bits in choice.items()
    )
    weight_bits = sum(measured.weight_bits[layer.name][layer.bits] for layer in layers)
    size = measured.overhead + sum(layer.nbytes for layer in layers)
    return Plan(
        layers=layers,
        skipped=dict(measured.skipped),
        measure=measured.measure,
        budget=budget,
        predicted_bytes=size if measured.overhead else None,
        avg_bits=weight_bits / sum(measured.numel[layer.name] for layer in layers),
        predicted_loss=sum(_monotone(layer.options)[layer.bits] for layer in layers),
    )


def _build(config: MixedPrecision, model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` quantized as ``plan`` says, with the plan in its history."""
    new = config.copy_model(model)
    for layer in plan.layers:
        module = new.get_submodule(layer.name)
        quantized = _quantize_layer(module, config.weight_only(layer.bits).scheme(), config.clip)
        new = set_layer(new, layer.name, quantized)
    summary = {"measure": plan.measure, "budget": plan.budget, "layers": plan.table()}
    record(new, config, [layer.name for layer in plan.layers], plan.skipped, {"plan": summary})
    return new
