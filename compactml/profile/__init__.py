"""``cml.profile``: what a model costs: size as stored, MACs, latency, peak memory, energy.

Each number comes from its own file: ``size.py`` (parameters, zeros, artifact bytes),
``flops.py`` (MACs per module), ``latency.py`` (timed runs in PyTorch eager),
``memory.py`` (peak activation bytes from tensor lifetimes), ``energy.py`` (an estimate from a
published per-operation table) and ``targets.py`` (devices, and whether the model fits one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from compactml.checks import check_finite, run_checked
from compactml.errors import CompactMLError
from compactml.profile.energy import Energy, estimate_energy, mac_kind
from compactml.profile.flops import ForwardTrace, trace_forward
from compactml.profile.latency import Latency, measure_latency
from compactml.profile.memory import ActivationMemory, peak_activation
from compactml.profile.size import (
    LayerStorage,
    count_params,
    dominant_dtype,
    layer_storage,
    stored_bytes,
)
from compactml.profile.targets import Fit, Target, check_fit, get_target, load_targets
from compactml.task import eval_mode, tensor_nbytes

__all__ = [
    "Energy",
    "Fit",
    "LayerProfile",
    "Latency",
    "Profile",
    "Target",
    "check_fit",
    "get_target",
    "load_targets",
    "profile",
]


@dataclass(frozen=True)
class LayerProfile:
    """One layer: a leaf module, or a module that stores tensors or does MACs itself.

    Counts and bytes are the module's own (children excluded); ``macs`` is per inference of the
    example input; ``output_shape`` is the shape of its (first) output, None if it did not run.
    """

    name: str
    type: str
    params: int
    nonzero_params: int
    stored_bytes: int
    macs: int
    output_shape: list[int] | None

    def to_dict(self) -> dict:
        """JSON-able form: the keys of ``Profile.to_dict()["layers"][i]``."""
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """What a model costs on one example input.

    ``stored_bytes`` is the size of the saved ``.cml`` artifact; ``macs`` multiply-accumulates
    per call; ``latency`` in milliseconds (None when skipped); ``peak_activation_bytes`` the
    most activation memory alive at once (None, with ``peak_activation_note`` saying why, when
    the model cannot be traced); ``energy`` an estimate in microjoules; ``target`` whether the
    model fits the device asked for (None when no device was given).
    """

    params: int
    nonzero_params: int
    stored_bytes: int
    macs: int
    latency: Latency | None
    peak_activation_bytes: int | None
    peak_activation_note: str | None
    energy: Energy
    layers: tuple[LayerProfile, ...]
    target: Fit | None

    def to_dict(self) -> dict:
        """The JSON-able layout read by reports (the keys are a contract; do not rename)."""
        return {
            "params": self.params,
            "nonzero_params": self.nonzero_params,
            "stored_bytes": self.stored_bytes,
            "macs": self.macs,
            "latency": self.latency.to_dict() if self.latency is not None else None,
            "peak_activation_bytes": self.peak_activation_bytes,
            "peak_activation_note": self.peak_activation_note,
            "energy": self.energy.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "target": self.target.to_dict() if self.target is not None else None,
        }


def _layers(
    model: nn.Module, storage: dict[str, LayerStorage], macs: dict[str, int], trace: ForwardTrace
) -> tuple[LayerProfile, ...]:
    layers = []
    for name, module in model.named_modules():
        own = storage[name]
        is_leaf = next(module.children(), None) is None
        if not (is_leaf or own.stored_bytes or macs[name]):
            continue
        layers.append(
            LayerProfile(
                name=name,
                type=type(module).__name__,
                params=own.params,
                nonzero_params=own.nonzero_params,
                stored_bytes=own.stored_bytes,
                macs=macs[name],
                output_shape=trace.output_shapes.get(name),
            )
        )
    return tuple(layers)


def _energy(
    layers: tuple[LayerProfile, ...],
    storage: dict[str, LayerStorage],
    total_macs: int,
    traffic: tuple[int, int],
    memory: str,
) -> Energy:
    fallback = mac_kind(dominant_dtype(storage))
    by_kind = {"fp32": 0, "fp16": 0, "int8": 0}
    for layer in layers:
        dtype = storage[layer.name].dtype
        by_kind[mac_kind(dtype) if dtype is not None else fallback] += layer.macs
    by_kind[fallback] += max(total_macs - sum(layer.macs for layer in layers), 0)
    weight_bytes = sum(entry.stored_bytes for entry in storage.values())
    return estimate_energy(by_kind, weight_bytes, traffic[0], traffic[1], memory)


def _traffic_and_ram(
    memory: ActivationMemory, trace: ForwardTrace, layers: tuple[LayerProfile, ...], inputs: Any
) -> tuple[tuple[int, int], int, str | None]:
    """``((input_bytes, activation_bytes), ram_activation_bytes, note)`` for energy and fit."""
    if memory.peak_bytes is not None:
        traffic = (memory.input_bytes, memory.activation_bytes)
        return traffic, memory.peak_bytes, memory.note
    leaf_outputs = sum(trace.output_bytes.get(layer.name, 0) for layer in layers)
    in_bytes = tensor_nbytes(inputs)
    upper = in_bytes + leaf_outputs
    note = f"{memory.note}; device RAM checked against {upper} bytes (all layer outputs at once)"
    return (in_bytes, leaf_outputs), upper, note


def profile(
    model: nn.Module,
    example_input: Any,
    target: str | Target | None = None,
    *,
    repeats: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    latency: bool = True,
) -> Profile:
    """Measure what ``model`` costs on ``example_input``, and whether it fits ``target``.

    Args:
        model: a PyTorch module; it is not changed (modes and thread count are restored).
        example_input: a tensor, a tuple (passed positionally) or a dict of tensors (passed as
            keyword arguments, Hugging Face style), e.g. ``task.example_input()``.
        target: a built-in device name (see ``targets.yaml``) or a :class:`Target`.
        repeats, warmup: timed and untimed runs for latency.
        threads: CPU threads for the latency runs (default: torch's current setting).
        latency: False skips the latency measurement (``Profile.latency`` is None).
    """
    if not isinstance(model, nn.Module):
        raise CompactMLError(
            f"profile needs a torch nn.Module, got {type(model).__name__}; pass the model object"
        )
    device = get_target(target) if target is not None else None  # before any measuring
    check_finite(model)
    with eval_mode(model):
        run_checked(model, example_input)
        trace = trace_forward(model, example_input)
        memory = peak_activation(model, example_input)
    timing = measure_latency(model, example_input, repeats, warmup, threads) if latency else None
    return _assemble(model, example_input, device, trace, memory, timing)


def _assemble(
    model: nn.Module,
    example_input: Any,
    device: Target | None,
    trace: ForwardTrace,
    memory: ActivationMemory,
    timing: Latency | None,
) -> Profile:
    """The Profile from the measurements: per-layer storage, artifact size, fit and energy."""
    storage = layer_storage(model)
    layers = _layers(model, storage, trace.module_macs, trace)
    params, nonzero = count_params(model)
    size = stored_bytes(model)
    traffic, ram_activations, note = _traffic_and_ram(memory, trace, layers, example_input)
    fit = check_fit(device, size, ram_activations) if device is not None else None
    on_chip = device is not None and device.on_chip and fit is not None and fit.fits
    return Profile(
        params=params,
        nonzero_params=nonzero,
        stored_bytes=size,
        macs=trace.total_macs,
        latency=timing,
        peak_activation_bytes=memory.peak_bytes,
        peak_activation_note=note,
        energy=_energy(layers, storage, trace.total_macs, traffic, "sram" if on_chip else "dram"),
        layers=layers,
        target=fit,
    )
