"""Calibration: run a task's batches through a model while observers record chosen tensors.

A :class:`QuantPoint` names one tensor (the input or output of a module); :func:`calibrate`
hooks one :class:`~compactml.quantize.observers.Observer` on each point and runs the batches;
:func:`point_qparams` turns every observer into ``(scale, zero_point)``. Non-finite values and
points the batches never reach raise a CompactMLError naming the module. Used by ``Static``
(:mod:`compactml.quantize.ptq`) and ``QAT`` (:mod:`compactml.quantize.qat`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.progress import progress_bar
from compactml.quantize.observers import Observer
from compactml.task import Task, eval_mode, split_batch


@dataclass
class QuantPoint:
    """One quantized tensor: where its observer looks (``module``, ``"input"`` or
    ``"output"``), and where quantizers with its scale go (``(module, role)`` with role
    ``input_quant``, ``output_quant`` or ``wrap`` for a QuantOutput)."""

    module: str
    side: str
    uses: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        """``"<module> <side>"``, for errors and records."""
        return f"{self.module or 'model'} {self.side}"


def _hook(model: nn.Module, point: QuantPoint, observer: Observer) -> object:
    """A hook on ``point``'s module feeding ``observer``; non-finite values raise, naming it."""

    def look(value: object) -> None:
        x = value[0] if isinstance(value, tuple) else value
        if not isinstance(x, torch.Tensor):
            return
        if not bool(torch.isfinite(x).all()):
            raise CompactMLError(
                f"calibration produced NaN or inf at the {point.describe()} of layer "
                f"{point.module!r}; check the model and the calibration data"
            )
        observer.observe(x)

    module = model.get_submodule(point.module)
    if point.side == "input":
        return module.register_forward_pre_hook(lambda m, args: look(args))
    return module.register_forward_hook(lambda m, args, out: look(out))


def calibrate(
    model: nn.Module,
    points: dict[object, QuantPoint],
    observers: dict[object, Observer],
    task: Task,
    batches: int | None,
    progress: bool,
    split: str = "calib",
    who: str = "Static",
) -> int:
    """Run ``batches`` batches of ``task``'s ``split`` (all when None) through ``model`` while
    each point's observer records its tensor; returns the number of batches. Non-finite values
    raise a CompactMLError naming the module; ``who`` (the config) is named when the data is
    empty."""
    handles = [_hook(model, point, observers[key]) for key, point in points.items()]
    seen = 0
    try:
        with eval_mode(model), torch.no_grad():
            data = task.batches(split, limit=batches)
            label = f"{who} calibration"
            for batch in progress_bar(data, label, total=batches, enabled=progress):
                task.run(model, split_batch(batch)[0])
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise CompactMLError(f"the task's {split} data is empty; {who} needs calibration batches")
    return seen


def never_reached(points: dict[object, QuantPoint], observers: dict[object, Observer]) -> list:
    """The keys of the points whose observer saw no data (the batches never reached them)."""
    return [key for key in points if not observers[key].seen]


def point_qparams(
    points: dict[object, QuantPoint], observers: dict[object, Observer], bits: int, signed: bool
) -> dict[object, tuple[float, int]]:
    """``{key: (scale, zero_point)}`` of every point's observer; a point the calibration
    batches never reached raises a CompactMLError naming it."""
    missing = never_reached(points, observers)
    if missing:
        where = ", ".join(points[key].describe() for key in missing)
        raise CompactMLError(
            f"the calibration batches never reached {where} (it ran on the example input); "
            "give calibration batches that exercise every path, or exclude those layers"
        )
    return {key: obs.qparams(bits, signed) for key, obs in observers.items()}
