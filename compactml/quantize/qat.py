"""Quantization-aware training with learned step sizes: ``QAT`` (LSQ, Esser et al. 2020).

The lifecycle, top to bottom in :meth:`QAT.apply`:

1. copy the model and fold each BatchNorm2d into the Conv2d right before it
   (:func:`fold_batchnorm`; the BatchNorm becomes ``nn.Identity``);
2. calibrate: the min/max of each selected layer's input over a few batches sets the initial
   activation scale (:func:`compactml.quantize.act.act_qparams`);
3. swap each selected Linear/Conv2d for a :class:`QATLayer` that fake-quantizes its input
   (:class:`~compactml.quantize.act.ActQuant`, uint8 codes) and its weight
   (:class:`WeightQuant`: symmetric, per-channel or per-group, step sizes initialised from the
   weight range as ``affine.choose_qparams`` does);
4. train weights, biases and step sizes with Adam on ``task.batch_loss`` (straight-through
   rounding; LSQ gradient scaling of the steps);
5. freeze: each layer becomes a ``QuantLinear``/``QuantConv2d`` holding the integer codes, with
   the frozen ``ActQuant`` as its ``input_quant``.

Weight step sizes are rounded to float16 in every training forward (straight-through), so the
float16 scale the frozen layer stores is the step that was trained with, and the frozen model's
outputs equal the training model's in eval mode. With ``epochs=0`` nothing is trained: that is
post-training quantization with min/max calibration (a baseline for QAT).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactml.config import Technique, record, replace_module
from compactml.errors import CompactMLError
from compactml.progress import progress_bar
from compactml.quantize import affine
from compactml.quantize.act import ActQuant, act_qparams, grad_scale
from compactml.quantize.affine import QScheme, weight_granularity
from compactml.quantize.calibration import QuantPoint, calibrate
from compactml.quantize.modules import QuantConv2d, QuantLinear
from compactml.quantize.observers import MinMaxObserver
from compactml.quantize.qweight import QWeight
from compactml.quantize.swap import set_layer, warn_skipped
from compactml.task import Task, eval_mode

FLOAT16_MAX = float(torch.finfo(torch.float16).max)
QAT_TYPES = (nn.Linear, nn.Conv2d)
NEVER_REACHED = "the calibration batches never reached it (no input to set its activation scale)"


# ---------------------------------------------------------------- BatchNorm folding


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with a bias) computing ``bn(conv(x))`` of ``bn`` in eval mode.

    ``w' = w * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. Neither input is changed.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise CompactMLError(
            "cannot fold a BatchNorm2d without running statistics (track_running_stats=False); "
            "exclude its convolution"
        )
    if bn.num_features != conv.out_channels:
        raise CompactMLError(
            f"BatchNorm2d has {bn.num_features} features but the convolution before it has "
            f"{conv.out_channels} output channels; they cannot be folded"
        )
    with torch.no_grad():
        factor = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            factor = factor * bn.weight.float()
        bias = conv.bias.float() if conv.bias is not None else torch.zeros(conv.out_channels)
        new_bias = (bias - bn.running_mean.float()) * factor
        if bn.bias is not None:
            new_bias = new_bias + bn.bias.float()
        args = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, True)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, *args, conv.padding_mode)
        fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * factor.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        fused.bias.copy_(new_bias)
    return fused


def _conv_bn_candidates(model: nn.Module, convs: set[str]) -> list[tuple[str, str]]:
    """``(conv, bn)`` names of a selected Conv2d and a BatchNorm2d that are consecutive
    children of one module (an nn.Sequential, or attributes defined one after the other)."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:], strict=False):
            full_a = f"{parent_name}.{a_name}" if parent_name else a_name
            full_b = f"{parent_name}.{b_name}" if parent_name else b_name
            if type(a) is nn.Conv2d and type(b) is nn.BatchNorm2d and full_a in convs:
                pairs.append((full_a, full_b))
    return pairs


def _feeds(model: nn.Module, pairs: list[tuple[str, str]], example: Any, task: Task) -> set:
    """The pairs where the BatchNorm, called once, reads exactly the tensor its conv returned
    (checked by hooks on one forward pass): only those may be folded."""
    outputs: dict[str, list] = {}
    inputs: dict[str, list] = {}
    handles = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        handles.append(
            conv.register_forward_hook(lambda m, a, out, n=conv_name: outputs[n].append(out))
        )
        handles.append(bn.register_forward_pre_hook(lambda m, a, n=bn_name: inputs[n].append(a)))
        outputs[conv_name], inputs[bn_name] = [], []
    try:
        with eval_mode(model), torch.no_grad():
            task.run(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return {
        (c, b)
        for c, b in pairs
        if len(outputs[c]) == 1 and len(inputs[b]) == 1 and inputs[b][0][0] is outputs[c][0]
    }


def fold_model(model: nn.Module, convs: set[str], task: Task) -> list[str]:
    """Fold, in place, every BatchNorm2d fed directly by one of the Conv2d named in ``convs``;
    each BatchNorm becomes ``nn.Identity``. Returns the names of the folded BatchNorms."""
    pairs = _conv_bn_candidates(model, convs)
    if not pairs:
        return []
    direct = _feeds(model, pairs, task.example_input(), task)
    folded = []
    for conv_name, bn_name in pairs:
        if (conv_name, bn_name) in direct:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            replace_module(model, conv_name, fold_batchnorm(conv, bn))
            replace_module(model, bn_name, nn.Identity())
            folded.append(bn_name)
    return folded


# ---------------------------------------------------------------- training-time layers


def float16_step(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` floored at float16's smallest positive value and rounded to the nearest float16
    value (returned as float32), with a straight-through gradient; the value is exact."""
    s = scale.clamp(min=2.0**-24, max=FLOAT16_MAX)
    return s + (s.to(torch.float16).float() - s).detach()


class WeightQuant(nn.Module):
    """Fake quantization of a weight with per-channel or per-group LSQ step sizes.

    The codes follow ``affine.py``'s symmetric convention (unsigned, zero at the middle code
    ``2**(bits-1)``), the steps start from ``affine.choose_qparams`` (``max|w| /
    (2**(bits-1) - 1)``) and are learned with the gradient scale ``1 / sqrt(n * Q_P)``
    (``n`` weights per step, ``Q_P = 2**(bits-1) - 1``) when ``learn`` is set.
    """

    def __init__(self, weight: torch.Tensor, scheme: QScheme, learn: bool) -> None:
        super().__init__()
        self.scheme, self.learn = scheme, learn
        self.weight_shape = tuple(weight.shape)
        scale, _ = affine.choose_qparams(weight.detach().float(), scheme)
        if learn:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        per_step = math.prod(self.weight_shape) // max(scale.numel(), 1)
        self.grad_factor = 1.0 / math.sqrt(per_step * (scheme.mid - 1))

    def step(self) -> torch.Tensor:
        """The float16-exact step sizes the forward pass uses (float32)."""
        s = float16_step(self.scale)
        return grad_scale(s, self.grad_factor) if self.learn and torch.is_grad_enabled() else s

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` fake-quantized with straight-through rounding."""
        return affine.fake_quantize(w, self.step(), None, self.scheme)

    @torch.no_grad()
    def freeze(self, w: torch.Tensor) -> QWeight:
        """The integer weight the forward pass represents, as :class:`QWeight` data."""
        step = self.step()
        codes = affine.quantize(w.float(), step, None, self.scheme)
        data = affine.pack(codes, self.scheme.bits)
        return QWeight(data, step.to(torch.float16), None, self.scheme, self.weight_shape)


class QATLayer(nn.Module):
    """A float ``layer`` (Linear or Conv2d) run on a fake-quantized input and weight."""

    def __init__(self, layer: nn.Module, weight_quant: WeightQuant, input_quant: ActQuant | None):
        super().__init__()
        self.layer, self.weight_quant, self.input_quant = layer, weight_quant, input_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's op with the fake-quantized weight on the fake-quantized input."""
        if self.input_quant is not None:
            x = self.input_quant(x)
        weight = self.weight_quant(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)

    def freeze(self) -> nn.Module:
        """The inference layer: a QuantLinear/QuantConv2d with the integer weight and the
        frozen input quantizer (bit-exact with this layer's eval-mode forward)."""
        cls = QuantConv2d if isinstance(self.layer, nn.Conv2d) else QuantLinear
        frozen = cls.from_float(self.layer, self.weight_quant.scheme)
        frozen._store(self.weight_quant.freeze(self.layer.weight))
        if self.input_quant is not None:
            frozen.input_quant = self.input_quant.freeze()
        return frozen


# ---------------------------------------------------------------- calibration and training


def input_observers(
    model: nn.Module, names: list[str], task: Task, batches: int, progress: bool
) -> dict[str, MinMaxObserver]:
    """A :class:`MinMaxObserver` of the input of each named module, fed ``batches`` batches of
    ``task.calib`` (``task.train`` when the task has no calibration data) by
    :func:`compactml.quantize.calibration.calibrate` (NaN or inf raise, naming the layer)."""
    split = "calib" if task.has("calib") else "train"
    points = {name: QuantPoint(name, "input") for name in names}
    observers = {name: MinMaxObserver() for name in names}
    calibrate(model, points, observers, task, batches, progress, split=split, who="QAT")
    return observers


def train(model: nn.Module, task: Task, epochs: int, lr: float, progress: bool) -> None:
    """Adam on ``task.batch_loss`` over ``task.train`` for ``epochs``, cosine-decayed per epoch;
    BatchNorm layers left unfolded keep their running statistics (eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    for _ in progress_bar(range(epochs), "quantization-aware training", enabled=progress):
        for batch in task.batches("train"):
            optimizer.zero_grad()
            loss = task.batch_loss(model, batch)
            if not bool(torch.isfinite(loss)):
                raise CompactMLError(
                    f"the QAT loss became {float(loss)}; lower lr (now {lr}) or check the data"
                )
            loss.backward()
            optimizer.step()
        schedule.step()
    model.eval()


# ---------------------------------------------------------------- the config


@dataclasses.dataclass(frozen=True)
class QAT(Technique):
    """Quantization-aware training with learned step sizes (LSQ: Esser et al. 2020, "Learned
    Step Size Quantization"), giving integer weights and uint8-quantized layer inputs.

    Args:
        weight_bits: 2 to 8 bits per weight (symmetric codes, float16 scales).
        act_bits: bits of each quantized layer's input (uint8 codes for 8, with a zero point),
            or None to keep inputs in float (weight-only QAT).
        epochs: passes over ``task.train``; 0 trains nothing, which is post-training
            quantization with min/max calibration.
        lr: Adam learning rate for weights, biases and step sizes, decayed by a cosine over the
            epochs. 1e-4 fine-tunes a trained model without undoing it (3 epochs bring
            digits-cnn at 4 and 3 bits back to its float accuracy); 2-bit weights want more
            (1e-3). Adam normalizes each gradient, so LSQ's gradient scale changes the steps'
            updates little here; it matters with SGD.
        learn_scales: train the step sizes (LSQ); False keeps the calibrated ones (STE only).
        group_size: weights per step along each row (16 to 256), None for one per channel.
        calib_batches: batches of ``task.calib`` (else ``task.train``) whose min/max set the
            initial activation scales.
        progress: show a progress bar over the epochs.
        include, exclude: fnmatch patterns on module names (Linear and Conv2d are quantized).

    BatchNorm2d layers right after a selected Conv2d are folded into it first (and become
    ``nn.Identity``); other BatchNorm layers keep their statistics during training. Layers the
    scheme cannot handle (a group size that does not divide the row, a weight with NaN or inf)
    and, with ``act_bits`` set, layers the calibration batches never reach stay in float and
    are named in a warning and in the model's history; NaN or inf in a calibrated layer's
    input is an error naming the layer.
    """

    family = "quantize"
    level = "weight_bits"
    weight_bits: int = 4
    act_bits: int | None = 8
    epochs: int = 3
    lr: float = 1e-4
    learn_scales: bool = True
    group_size: int | None = None
    calib_batches: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        weight_granularity(self.group_size)  # validates group_size
        self.scheme()  # validates weight_bits
        if self.act_bits is not None:
            ActQuant(bits=self.act_bits)  # validates act_bits
        for field, low in (("epochs", 0), ("calib_batches", 1)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise CompactMLError(f"{field} must be an integer >= {low}, got {value!r}")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
            raise CompactMLError(f"lr must be a positive number such as 1e-4, got {self.lr!r}")
        for field in ("learn_scales", "progress"):
            if not isinstance(getattr(self, field), bool):
                raise CompactMLError(f"{field} must be true or false, got {getattr(self, field)!r}")

    def scheme(self) -> QScheme:
        """The weight :class:`QScheme` (symmetric, per-channel or per-group, float16 scales)."""
        return QScheme(self.weight_bits, True, weight_granularity(self.group_size))

    def _chosen(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        """Names of the layers to quantize, and the skipped ones with the reason."""
        chosen = self.targets(model, QAT_TYPES)
        if not chosen:
            raise CompactMLError(
                f"QAT found no Linear or Conv2d layer selected by include={list(self.include)} "
                f"exclude={list(self.exclude)}; check the patterns against the module names"
            )
        names, skipped = [], {}
        for name, module in chosen:
            try:
                affine.param_shape(tuple(module.weight.shape), self.scheme().granularity)
            except CompactMLError as exc:
                skipped[name] = str(exc)
                continue
            if not bool(torch.isfinite(module.weight).all()):
                skipped[name] = "the weight has NaN or inf values; fix the weights or exclude it"
                continue
            names.append(name)
        if not names:
            name, reason = next(iter(skipped.items()))
            raise CompactMLError(f"no selected layer can be quantized; {name or 'model'}: {reason}")
        return names, skipped

    def _qat_layer(self, module: nn.Module, lo_hi: tuple[float, float] | None) -> QATLayer:
        input_quant = None
        if lo_hi is not None and self.act_bits is not None:
            scale, zero = act_qparams(*lo_hi, bits=self.act_bits, signed=False)
            input_quant = ActQuant(self.act_bits, False, scale, zero, learn=self.learn_scales)
            input_quant.to(module.weight.device)
        weight_quant = WeightQuant(module.weight, self.scheme(), self.learn_scales)
        return QATLayer(module, weight_quant, input_quant)

    def prepare(self, model: nn.Module, task: Task) -> tuple[nn.Module, list[str], list[str]]:
        """A copy of ``model`` ready to train: BatchNorms folded, selected layers swapped for
        :class:`QATLayer`. Returns it, the quantized names and the folded BatchNorm names.

        With ``act_bits`` set, a selected layer the calibration batches never reach (no input
        to set its activation scale from) stays in float and is left out of the names;
        :meth:`apply` lists it in a warning and in the model's history."""
        new = self.copy_model(model)
        names, _ = self._chosen(new)
        convs = {n for n in names if isinstance(new.get_submodule(n), nn.Conv2d)}
        folded = fold_model(new, convs, task)
        ranges: dict[str, tuple[float, float]] = {}
        if self.act_bits is not None:
            observers = input_observers(new, names, task, self.calib_batches, self.progress)
            ranges = {n: (obs.lo, obs.hi) for n, obs in observers.items() if obs.seen}
            if not ranges:
                raise CompactMLError(
                    f"the calibration batches never reached any selected layer "
                    f"({', '.join(n or 'model' for n in names)}); check the task's data"
                )
            names = [n for n in names if n in ranges]
        for name in names:
            new = set_layer(new, name, self._qat_layer(new.get_submodule(name), ranges.get(name)))
        return new, names, folded

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A quantized copy of ``model`` (eval mode) trained on ``task.train`` for ``epochs``."""
        if not isinstance(task, Task):
            raise CompactMLError(
                "QAT needs a Task with calib and train batches; pass quantize(model, QAT(), task)"
            )
        chosen, skipped = self._chosen(model)
        new, names, folded = self.prepare(model, task)
        for name in chosen:
            if name not in names:
                skipped[name] = NEVER_REACHED
        warn_skipped(self, skipped)
        if self.epochs:
            train(new, task, self.epochs, float(self.lr), self.progress)
        for name in names:
            new = set_layer(new, name, new.get_submodule(name).freeze())
        record(new, self, names + folded, skipped)
        return new.eval()
