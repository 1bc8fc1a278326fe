"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration").

A few input channels carry much larger activations than the rest, and the weights that read
them matter most. AWQ multiplies input channel ``j`` of the weight by ``s_j`` before
round-to-nearest and divides the activation by ``s_j`` (folded into the operation that produces
it), so ``X W^T = (X / s) (W * s)^T`` stays exact in float while the salient weights get a finer
relative grid. The scales are ``s = mean|X_j| ** alpha`` (normalized so their geometric mean of
max and min is 1), with ``alpha`` chosen on a grid in ``[0, 1)`` to minimize the output error of
the quantized layer on calibration inputs; ``alpha = 0`` is plain round-to-nearest, so the
search never does worse than RTN on the data it sees.

Then, as the reference's ``auto_clip``, each block of the scaled weight (one output row, one
group of input columns) gets the clipping range ``r * [min, max]``, ``r`` from 1.0 down to 0.5,
that minimizes the error that block adds to the layer's output on the calibration inputs of its
columns (:func:`compactml.quantize.clip.mse_clip` with the inputs' Gram matrix): the scales
alone leave every block's range set by its largest weight, and clipping what the data says is
cheap to clip is what turns AWQ from "not worse than RTN on the sample" into a clear win on
held-out data (tiny-llama, all Linear layers, 4-bit g64: perplexity increase 0.26 without
clipping, 0.013 with it; RTN 0.29). Measured and not kept, because they were no better beyond
the noise of the measurement: searching the clip inside every ``alpha`` candidate (twice the
time), AutoAWQ's weight-aware scales ``mean|x|^a / mean|w|^(1-a)``, weighting each layer of a
group equally in the objective, other normalizations of ``s`` (rounding to nearest with one
scale per block is invariant to a common factor of ``s``, up to the float16 rounding of the
stored scales; the normalization only keeps the folded weights in range).

:func:`awq_search` is the math. :class:`AWQ` is the config, on the block runner
(:func:`compactml.calib.capture.run_blockwise`), as in the reference implementation
(github.com/mit-han-lab/llm-awq): per block, the selected Linear layers are grouped by the tensor
they read (:func:`compactml.quantize.fold.input_groups`: q/k/v share the attention norm's output,
gate/up the MLP norm's), one ``alpha`` is searched per group over the group's weights stacked
row-wise (they must share one ``s``), the scales are folded into the producer of the input
(a norm or a Linear) or kept as an explicit scale
(:func:`compactml.quantize.fold.fold_input_scale`), and the scaled weights are rounded to
nearest, in their clipped ranges, into the same ``QuantLinear`` that ``WeightOnly`` makes.

The inputs of a group are summarized over every calibration token by their per-channel mean
``|x|`` (the scale statistic) and, for the error the search minimizes, a uniform random sample
of at most :data:`SAMPLE_TOKENS` tokens (seeded, so a run is reproducible), so memory stays
bounded whatever the calibration set; the errors are computed from the sample's ``in x in``
Gram matrix, so no candidate ever holds a ``tokens x out`` product.

Three differences from the reference. It skips clipping the query and key projections (their
error reaches the output through the attention scores); here every layer is clipped, which
measured better on both models. It folds the scales of ``o_proj`` into ``v_proj`` and of
``down_proj`` into ``up_proj`` (through the attention and the gated product, which are linear in
those inputs); here scales fold only into the module that produced the tensor itself, and
``o_proj``/``down_proj`` keep an explicit scale (one ``Mul`` before the layer). Its objective
for q/k/v and gate/up is the output of the whole attention or MLP module; here it is the
stacked outputs of the group's layers, which needs no knowledge of the architecture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from compactml.calib.capture import Block, collect, run_blockwise
from compactml.calib.layers import quantizable_linears
from compactml.calib.stats import ChannelStats
from compactml.config import Technique, check_bools, check_positive_ints, record
from compactml.errors import CompactMLError
from compactml.quantize import affine
from compactml.quantize.affine import QScheme, choose_qparams, fake_quantize
from compactml.quantize.clip import mse_clip
from compactml.quantize.fold import (
    InputGroup,
    fold_input_scale,
    input_groups,
    linear_name,
)
from compactml.quantize.modules import QuantLinear
from compactml.quantize.qweight import QWeight
from compactml.quantize.swap import set_layer, warn_skipped
from compactml.task import Task

SAMPLE_TOKENS = 4096  # input tokens per group kept for the search's error
CLIP_GRID, CLIP_MIN_RATIO = 20, 0.5  # clipping ratios tried: 1.0 down to 0.5


@dataclass(frozen=True)
class AWQScales:
    """The chosen per-input-channel ``scales`` (``[in]``), their exponent ``alpha``, the scale
    and zero point the scaled weight ``W * s`` is rounded with (``qscale``, ``qzero``: clipped
    ranges when the search clips), and the relative output error of the quantized layer with
    all of that (``error``) and of plain round-to-nearest (``rtn``)."""

    scales: torch.Tensor
    alpha: float
    error: float
    rtn: float
    qscale: torch.Tensor
    qzero: torch.Tensor | None


def block_grams(gram: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """The diagonal blocks of an ``(in, in)`` input Gram matrix that each scale block of a
    weight row reads: ``(in / size, size, size)`` for per-group scales, ``(1, in, in)`` for
    per-row ones (the ``gram`` that :func:`compactml.quantize.clip.mse_clip` takes)."""
    gran = scheme.granularity
    if not isinstance(gran, affine.PerGroup):
        return gram.unsqueeze(0)
    n, size = gram.shape[0] // gran.size, gran.size
    return gram.reshape(n, size, n, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def quantized_with_scales(
    weight: torch.Tensor,
    scales: torch.Tensor,
    scheme: QScheme,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``Q(W * s) / s``, the float weight the layer effectively uses with scales ``s``, and
    the scale and zero point ``W * s`` was rounded with: min/max ranges, or, given ``gram``
    (``X^T X`` of the layer's inputs), each block's range clipped for the least output error
    on those inputs (the scaled layer reads ``X / s``, whose Gram matrix that is divided by
    ``s_i s_j``)."""
    s = scales.reshape(1, -1)
    scaled = weight * s
    if gram is None:
        qscale, qzero = choose_qparams(scaled, scheme)
    else:
        grams = block_grams(gram / (s.T * s), scheme)
        qscale, qzero = mse_clip(scaled, scheme, CLIP_GRID, CLIP_MIN_RATIO, gram=grams)
    return fake_quantize(scaled, qscale, qzero, scheme) / s, qscale, qzero


def awq_search(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    scheme: QScheme,
    grid: int = 20,
    mean_abs: torch.Tensor | None = None,
    clip: bool = True,
) -> AWQScales:
    """Choose AWQ scales for a linear ``weight`` (``[out, in]``) from calibration ``inputs``
    (``[tokens, in]``) under quantization ``scheme``, trying ``alpha = i / grid`` for
    ``i = 0 .. grid - 1``, then (``clip``) a clipping range per block of the scaled weight.
    ``mean_abs`` is the per-channel mean ``|x|`` the scales are built from (default: over
    ``inputs``; pass it when ``inputs`` is a sample of more tokens).

    Every error is ``||X (Q - W)^T||^2`` computed as ``sum((D G) * D)`` with ``D = Q - W`` and
    the inputs' Gram matrix ``G = X^T X``: the same number without a ``[tokens, out]`` product
    per candidate, so time and memory scale with the weight, not with the token sample."""
    if weight.dim() != 2 or inputs.dim() != 2 or inputs.shape[1] != weight.shape[1]:
        raise CompactMLError(
            f"AWQ needs a [out, in] weight and [tokens, in] inputs, got {tuple(weight.shape)} "
            f"and {tuple(inputs.shape)}"
        )
    if not isinstance(grid, int) or grid < 1:
        raise CompactMLError(f"grid must be a positive integer, got {grid!r}")
    w, x = weight.detach().float(), inputs.detach().float()
    gram = x.T @ x
    if mean_abs is None:
        mean_abs = x.abs().mean(dim=0)
    elif tuple(mean_abs.shape) != (w.shape[1],):
        raise CompactMLError(
            f"mean_abs must hold one value per input channel ({w.shape[1]}), got "
            f"{tuple(mean_abs.shape)}"
        )
    mean_abs = mean_abs.detach().float().to(x.device).clamp(min=1e-4)
    norm = float(((w @ gram) * w).sum()) or 1.0

    def error(quantized: torch.Tensor) -> float:
        d = quantized - w
        return float(((d @ gram) * d).sum()) / norm

    best: AWQScales | None = None
    for i in range(grid):
        alpha = i / grid
        s = mean_abs**alpha
        s = s / (s.max() * s.min()).sqrt()
        try:
            quantized, qscale, qzero = quantized_with_scales(w, s, scheme)
        except CompactMLError:  # scales too large for float16: not a candidate
            if i == 0:
                raise
            continue
        found = AWQScales(s, alpha, error(quantized), 0.0, qscale, qzero)
        if best is None or found.error < best.error:
            best = found
        if i == 0:
            rtn = found.error
    assert best is not None
    if clip:  # per-block choices ignore the error terms across blocks: keep it only if better
        quantized, qscale, qzero = quantized_with_scales(w, best.scales, scheme, gram)
        if error(quantized) < best.error:
            best = dataclasses.replace(best, error=error(quantized), qscale=qscale, qzero=qzero)
    return dataclasses.replace(best, rtn=rtn)


class TokenSample(ChannelStats):
    """:class:`~compactml.calib.stats.ChannelStats` over every token, plus a uniform random
    sample of at most ``limit`` of the tokens (each token gets a seeded random key and the
    ``limit`` smallest keys are kept), so memory is bounded by ``limit`` rows."""

    def __init__(self, columns: int, limit: int = SAMPLE_TOKENS, seed: int = 0) -> None:
        super().__init__(columns)
        self.limit = int(limit)
        self.generator = torch.Generator().manual_seed(seed)
        self.rows = torch.zeros(0, self.columns)
        self.keys = torch.zeros(0)

    def _add(self, rows: torch.Tensor) -> None:
        super()._add(rows)
        keys = torch.rand(rows.shape[0], generator=self.generator).to(rows.device)
        self.rows = torch.cat([self.rows.to(rows.device), rows])
        self.keys = torch.cat([self.keys.to(rows.device), keys])
        if len(self.keys) > self.limit:
            keep = self.keys.topk(self.limit, largest=False).indices
            self.rows, self.keys = self.rows[keep], self.keys[keep]

    def sample(self) -> torch.Tensor:
        """The sampled tokens, ``(min(tokens, limit), columns)``."""
        return self.rows


@dataclasses.dataclass(frozen=True)
class AWQ(Technique):
    """Activation-aware weight quantization of ``nn.Linear`` layers (Lin et al. 2023),
    calibrated block by block on ``task.calib``; activations stay float.

    Args:
        bits: 2 to 8 bits per weight.
        group_size: weights per scale along each row (16, 32, 64, 128 or 256); None gives one
            scale per output channel.
        symmetric: zero point fixed at the middle code; False stores a uint8 zero per scale.
        grid: exponents ``alpha = i / grid`` tried per group of layers (``alpha = 0`` is
            round-to-nearest, so on the calibration sample a group never does worse than it).
        clip: after scaling, clip each block's range (ratios 1.0 to 0.5 of its min/max) where
            that lowers the block's error on the layer's output for the calibration sample
            (see the module docstring). A switch, not ``WeightOnly``'s ``clip="mse"`` choice:
            AWQ has calibration inputs, and the output error they give is the one criterion
            worth having; False reproduces scaling then plain round-to-nearest.
        calib_batches: batches of ``task.calib`` to use (None: all of them).
        progress: show a progress bar over the blocks.
        include, exclude: fnmatch patterns on module names.

    Layers reading one tensor share their scales; where those fold is recorded per group
    (``"norm"``, ``"linear"``, or ``"explicit"``: the layer is wrapped in a
    :class:`~compactml.quantize.fold.ScaledInput`, which ``.cml`` files and ONNX export keep).
    The quantized layers are the ``QuantLinear`` that ``WeightOnly`` makes (``MatMulNBits`` in
    ONNX). A group whose calibration inputs were empty or held NaN/Inf, and a layer whose group
    size does not divide its width, stay in float, named in a warning and in the history.
    """

    family = "quantize"
    level = "bits"
    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True
    grid: int = 20
    clip: bool = True
    calib_batches: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        affine.weight_granularity(self.group_size)  # validates group_size
        check_bools(self, "symmetric", "clip", "progress")
        check_positive_ints(self, "grid", "calib_batches")
        self.scheme()  # validates bits

    def scheme(self) -> QScheme:
        """The :class:`QScheme` the codes are written in."""
        return QScheme(self.bits, self.symmetric, affine.weight_granularity(self.group_size))

    def _layers(self, model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, str]]:
        """The selected Linear layers AWQ can quantize, and the others with the reason."""
        return quantizable_linears(self, model, self.scheme())

    def search(self, weights: list[torch.Tensor], sample: TokenSample) -> AWQScales:
        """The scales of one group of layers (their ``weights``) from their input ``sample``;
        raises CompactMLError when the statistics or the result are unusable."""
        problem = sample.problem()
        if problem:
            raise CompactMLError(problem)
        found = awq_search(
            torch.cat([w.detach() for w in weights]),
            sample.sample(),
            self.scheme(),
            self.grid,
            sample.mean_abs(),
            self.clip,
        )
        if not (bool(torch.isfinite(found.scales).all()) and math.isfinite(found.error)):
            raise CompactMLError("the AWQ scale search produced non-finite values")
        return found

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A copy of ``model`` whose selected Linear layers are AWQ-scaled and quantized."""
        new = self.copy_model(model)
        layers, skipped = self._layers(new)
        changed: list[str] = []
        groups: list[dict] = []
        root: dict[str, nn.Module] = {}  # a bare Linear model's replacement

        def step(block: Block) -> None:
            mine = {name: m for name, m in block.named_modules() if name in layers}
            if not mine:
                return
            found = input_groups(new, mine, block.forward)
            firsts = {g.layers[0]: mine[g.layers[0]] for g in found}
            samples = collect(block, firsts, lambda m: TokenSample(m.in_features))
            for group in found:
                weights = [mine[name].weight for name in group.layers]
                try:
                    scales = self.search(weights, samples[group.layers[0]])
                except CompactMLError as exc:
                    skipped.update(dict.fromkeys(group.layers, str(exc)))
                    continue
                if group.layers == ("",):  # fold inside a holder, then take the layer out
                    holder = nn.ModuleDict({"model": new})
                    self._quantize_group(holder, InputGroup(("model",), None, "explicit"), scales)
                    root[""] = holder["model"]
                else:
                    self._quantize_group(new, group, scales)
                changed.extend(group.layers)
                groups.append(
                    {"layers": list(group.layers), "kind": group.kind, "producer": group.producer}
                    | {"alpha": scales.alpha, "error": scales.error, "rtn": scales.rtn}
                )

        info = run_blockwise(new, task, step, self.calib_batches, self.progress, "AWQ")
        if not changed:
            name, reason = next(iter(skipped.items()))
            raise CompactMLError(f"AWQ could not quantize any layer; {name or 'model'}: {reason}")
        if root:
            new = set_layer(new, "", root[""])
        warn_skipped(self, skipped)
        record(new, self, changed, skipped, details={"awq": info | {"groups": groups}})
        return new

    def _quantize_group(self, model: nn.Module, group: InputGroup, scales: AWQScales) -> None:
        """Fold the group's scales into ``model`` (nothing to fold when ``alpha`` is 0: plain
        round-to-nearest) and swap its layers for QuantLinear."""
        if scales.alpha > 0:
            fold_input_scale(model, group, scales.scales)
        scheme, first = self.scheme(), 0
        for name in group.layers:
            at = linear_name(model, name)
            layer = model.get_submodule(at)
            rows = slice(first, first + layer.out_features)  # the layer's rows of the stack
            first = rows.stop
            scale = scales.qscale[rows]
            zero = None if scales.qzero is None else scales.qzero[rows]
            codes = affine.quantize(layer.weight.float(), scale, zero, scheme)
            q = QWeight.from_codes(codes, scale, zero, scheme)
            set_layer(model, at, QuantLinear.from_qweight(q, layer.bias))
