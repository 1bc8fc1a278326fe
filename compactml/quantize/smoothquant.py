"""SmoothQuant: move activation outliers into the weights, then static W8A8 quantization.

Xiao, Lin, Seznec, Wu, Demouth and Han 2022, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models". Transformer activations have a few
input channels whose values are tens of times larger than the rest; one uint8 scale per tensor
then spends its whole range on them and rounds every other channel to a handful of codes,
while the weights are easy to quantize. SmoothQuant divides input channel ``j`` of the
activation by ``s_j`` and multiplies column ``j`` of every weight reading it by ``s_j``, so
``X W^T = (X / s) (W * s)^T`` is unchanged in float, with

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

(``max|X_j|`` over the calibration tokens, ``max|W_j|`` over the output rows of every layer
reading ``X``): ``alpha`` says how much of the difficulty moves to the weights (0.5 evens out
the two maxima, ``max|X_j / s_j| = max|W_j * s_j|``). Channels that never fire, or that no
weight reads, keep ``s_j = 1``.

:func:`smooth_scales` is the math. :class:`SmoothQuant` measures ``max|X_j|`` block by block
(:func:`compactml.calib.capture.run_blockwise`, so memory grows with one block, not with
depth), finds which layers read one same tensor and what produced it from one traced call of
each block (:func:`compactml.quantize.fold.input_groups`), folds ``1 / s`` into that producer
(a LayerNorm's or RMSNorm's gain, a Linear's rows) or, where the tensor has other readers (a
residual stream, a post-norm BERT's LayerNorm output) or no such producer, into an explicit
``x * (1 / s)`` in front of each layer (:class:`~compactml.quantize.fold.ScaledInput`, one
``Mul`` in ONNX), and then applies :class:`~compactml.quantize.ptq.Static` to the smoothed
model, whose activation quantizers therefore observe the smoothed tensors ``X / s`` (for an
explicit scale: the inner layer's input, after the multiplication). The PyTorch model is the
accuracy reference, as for ``Static``.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial

import torch
from torch import nn

from compactml.calib.capture import Block, collect, run_blockwise
from compactml.calib.stats import ChannelStats
from compactml.config import HISTORY_ATTR, Technique, history, record
from compactml.errors import CompactMLError
from compactml.quantize.fold import InputGroup, fold_input_scale, input_groups
from compactml.quantize.ptq import Static
from compactml.task import Task

SCALE_FLOOR = 1e-5  # below this a maximum counts as zero (the reference clamps at 1e-5)


def _check_alpha(alpha: object) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise CompactMLError(f"alpha must be a number from 0 to 1 (e.g. 0.5), got {alpha!r}")


def smooth_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The smoothing factors ``s_j = act_absmax_j ** alpha / weight_absmax_j ** (1 - alpha)``
    (float32, one per input channel; see the module docstring). A channel whose activation or
    weight maximum is zero (below ``1e-5``: it never fires, or no weight reads it) gets
    ``s_j = 1``: there is nothing to migrate, and a zero would make ``X / s`` infinite."""
    _check_alpha(alpha)
    if act_absmax.dim() != 1 or act_absmax.shape != weight_absmax.shape:
        raise CompactMLError(
            "smooth_scales needs one activation and one weight maximum per input channel; got "
            f"shapes {tuple(act_absmax.shape)} and {tuple(weight_absmax.shape)}"
        )
    a, w = act_absmax.detach().float(), weight_absmax.detach().float()
    finite = bool(torch.isfinite(a).all() and torch.isfinite(w).all())
    if not finite or bool((a < 0).any() or (w < 0).any()):
        raise CompactMLError("smooth_scales needs finite, non-negative maxima")
    live = (a >= SCALE_FLOOR) & (w >= SCALE_FLOOR)
    scales = a.clamp(min=SCALE_FLOOR).pow(alpha) / w.clamp(min=SCALE_FLOOR).pow(1 - alpha)
    return torch.where(live, scales, torch.ones_like(scales))


def _absmax(stats: ChannelStats) -> torch.Tensor:
    """``max|x_j|`` per input channel over every calibration token."""
    return torch.maximum(stats.max.abs(), stats.min.abs())


@dataclasses.dataclass(frozen=True)
class SmoothQuant(Technique):
    """SmoothQuant W8A8 (Xiao et al. 2022): per-input-channel smoothing with strength
    ``alpha``, then :class:`~compactml.quantize.ptq.Static` (8-bit symmetric weights, uint8
    activations calibrated on ``task.calib``); see the module docstring.

    Args:
        alpha: migration strength, from 0 (the activations keep their outliers; only the
            weight columns are evened out, ``s_j = 1 / max|W_j|``) to 1 (every channel's
            activation maximum moves into the weights); 0.5 balances the two.
        observer, percentile, per_channel: passed to ``Static`` (activation range observer,
            its percentile, one weight scale per output channel).
        calib_batches: batches of ``task.calib`` to measure and calibrate on (None: all).
        progress: show progress bars.
        include, exclude: fnmatch patterns on module names; they select the Linear layers
            that are smoothed and the layers ``Static`` quantizes.

    A layer whose calibration inputs were empty or held NaN/Inf is quantized without
    smoothing, named in a warning and under ``smoothing.unsmoothed`` in the model's history;
    the one history entry also holds the smoothing groups (layers, producer, fold kind, scale
    range) and ``Static``'s details.
    """

    family = "quantize"
    alpha: float = 0.5
    observer: str = "minmax"
    percentile: float = 99.99
    per_channel: bool = True
    calib_batches: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_alpha(self.alpha)
        self.static()  # validates the rest

    def static(self) -> Static:
        """The ``Static`` config applied after smoothing (8-bit weights, same selection)."""
        return Static(
            bits=8,
            observer=self.observer,
            percentile=self.percentile,
            per_channel=self.per_channel,
            calib_batches=self.calib_batches,
            progress=self.progress,
            include=self.include,
            exclude=self.exclude,
        )

    def _layers(self, model: nn.Module) -> dict[str, nn.Linear]:
        if type(model) is nn.Linear:
            raise CompactMLError(
                "SmoothQuant smooths layers inside a model; wrap a single layer in nn.Sequential"
            )
        layers = {
            name: layer
            for name, layer in self.targets(model, (nn.Linear,))
            if bool(torch.isfinite(layer.weight).all())
        }
        if not layers:
            raise CompactMLError(
                f"SmoothQuant found no Linear layer with finite weights selected by include="
                f"{list(self.include)} exclude={list(self.exclude)}; check the patterns against "
                "the model's module names"
            )
        return layers

    def smooth(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A float copy of ``model`` with the selected layers' inputs smoothed: its outputs
        equal ``model``'s up to float rounding (:meth:`apply` then quantizes it).

        Each block's statistics and input groups (traced on its first calibration call) are
        gathered when the block runner reaches it; the scales are folded only after the last
        block, so every statistic comes from the unchanged float model and nothing is changed
        under the runner's captured block inputs."""
        new = self.copy_model(model)
        layers = self._layers(new)
        stats: dict[str, ChannelStats] = {}
        groups: list[InputGroup] = []

        def step(block: Block) -> None:  # measure now, fold at the end (see the docstring)
            mine = {name: m for name, m in block.named_modules() if name in layers}
            stats.update(collect(block, mine, lambda m: ChannelStats(m.in_features)))
            usable = {name: m for name, m in mine.items() if stats[name].problem() is None}
            if usable:  # the model-level rest is traced on one example, not a counted run
                run = block.forward if block.name else partial(task.run, new, task.example_input())
                groups.extend(input_groups(new, usable, run))

        info = run_blockwise(new, task, step, self.calib_batches, self.progress, "SmoothQuant")
        unsmoothed = {name: p for name, s in stats.items() if (p := s.problem())}
        done, changed = [], []
        for group in groups:
            act = torch.stack([_absmax(stats[n]) for n in group.layers]).amax(0)
            weight = torch.stack([layers[n].weight.detach().abs().amax(0) for n in group.layers])
            scales = smooth_scales(act.to(weight.device), weight.amax(0), self.alpha)
            fold_input_scale(new, group, scales)
            changed += [*group.layers, *([group.producer] if group.producer else [])]
            done.append(
                {
                    "layers": list(group.layers),
                    "producer": group.producer,
                    "kind": group.kind,
                    "scale_min": float(scales.min()),
                    "scale_max": float(scales.max()),
                }
            )
        if unsmoothed:
            listed = "; ".join(f"{name}: {reason}" for name, reason in unsmoothed.items())
            warnings.warn(
                f"SmoothQuant left {len(unsmoothed)} layer(s) unsmoothed: {listed}",
                stacklevel=2,
            )
        details = {"alpha": self.alpha, "groups": done, "unsmoothed": unsmoothed, **info}
        record(new, self, list(dict.fromkeys(changed)), details={"smoothing": details})
        return new

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A smoothed (:meth:`smooth`), statically W8A8-quantized copy of ``model``."""
        smoothed = self.smooth(model, task)
        quantized = self.static().apply(smoothed, task)
        *before, smoothing, static = history(quantized)
        object.__setattr__(quantized, HISTORY_ATTR, before)  # one entry for both steps
        kept = ("technique", "family", "params", "changed", "skipped")
        details = {
            "smoothing": smoothing["smoothing"],
            "static": {k: v for k, v in static.items() if k not in kept},
        }
        record(quantized, self, static["changed"], static["skipped"], details)
        return quantized
