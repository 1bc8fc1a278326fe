"""GPTQ: post-training weight quantization that corrects each rounding error with the Hessian.

Frantar, Ashkboos, Hoefler and Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers". For a linear layer with weight ``W`` (rows x columns) and
calibration inputs ``X``, GPTQ quantizes the columns of ``W`` one at a time and, after each,
updates the columns not yet quantized so that the layer's output error ``||XW^T - XQ^T||^2``
stays as small as possible; the update comes from ``H = 2 X^T X / n`` through the upper
Cholesky factor of ``H^-1`` (Algorithm 1 of the paper).

:func:`gptq_quantize` is the math: a pure function on tensors returning a
:class:`~compactml.quantize.qweight.QWeight` (the same plain data round-to-nearest produces, so
saving and ONNX export are unchanged). :class:`GPTQ` is the config: it gathers each layer's
Hessian block by block (:func:`compactml.calib.capture.run_blockwise`) and swaps the layers.

Choices, following the reference implementation (github.com/IST-DASLab/gptq):

- dead inputs (``H_jj == 0``: the column never sees a non-zero input) get ``H_jj = 1`` and a
  zero weight; ``damp * mean(diag H)`` is added to the diagonal before the factorization;
- columns are processed in blocks of ``block_size`` with lazy batch updates (the error of a
  block reaches later blocks in one matrix product);
- a group's scale and zero point are chosen when its first column is reached, by min/max of
  the group's *current* (error-updated) weights, exactly as round-to-nearest chooses them;
- ``act_order`` processes columns by descending ``diag(H)`` and un-permutes the result; groups
  stay runs of consecutive columns in the original order (the reference's "static groups"),
  with their scales chosen from the original weights before any update, so the stored layout is
  the one round-to-nearest writes.

With ``H = I`` no error is propagated and GPTQ returns exactly round-to-nearest's codes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from compactml.calib.capture import Block, collect, run_blockwise
from compactml.calib.layers import quantizable_linears
from compactml.calib.stats import HessianStats
from compactml.config import Technique, check_bools, check_positive_ints, record
from compactml.errors import CompactMLError
from compactml.quantize import affine
from compactml.quantize.affine import PerChannel, PerGroup, QScheme
from compactml.quantize.modules import QuantLinear
from compactml.quantize.qweight import QWeight
from compactml.quantize.swap import set_layer, warn_skipped
from compactml.task import Task

DAMP_TRIES = 4  # factorizations tried per layer, multiplying damp by 10 after each failure
T = TypeVar("T")


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U``; float32,
    computed in float64). Raises ``torch.linalg.LinAlgError`` when the damped ``H`` is not
    positive definite.

    The reference factorizes ``H``, inverts it and factorizes the inverse; the same ``U`` comes
    from one factorization and one triangular inverse: with ``J`` the reversal permutation and
    ``J H J = L L^T``, ``H = R R^T`` for the upper triangular ``R = J L J``, so
    ``H^-1 = (R^-1)^T R^-1`` and ``U = R^-1 = J L^-1 J``.
    """
    h = hessian.double()
    h = h + torch.eye(len(h), dtype=h.dtype, device=h.device) * (damp * h.diagonal().mean())
    lower = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(len(h), dtype=h.dtype, device=h.device)
    upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
    if not bool(torch.isfinite(upper).all()):
        raise torch.linalg.LinAlgError("the inverse Hessian factor is not finite")
    return upper.float()


def with_damping(solve: Callable[[float], T], damp: float, who: str, name: str) -> T:
    """``solve(damp)``, retried with ``damp`` multiplied by 10 while it raises
    ``torch.linalg.LinAlgError`` (the damped Hessian is not positive definite), up to
    ``DAMP_TRIES`` tries. Each retry warns, naming the method ``who`` and the layer ``name``,
    because the extra damping weakens the method's correction for that layer. Raises
    CompactMLError when every try fails. Shared by GPTQ and SparseGPT."""
    for _ in range(DAMP_TRIES - 1):
        try:
            return solve(damp)
        except torch.linalg.LinAlgError:
            warnings.warn(
                f"{who}: the Hessian of {name or 'model'} is not positive definite with "
                f"damp={damp:g}; retrying with damp={damp * 10:g}",
                stacklevel=3,
            )
            damp *= 10
    try:
        return solve(damp)
    except torch.linalg.LinAlgError:
        raise CompactMLError(
            f"the Hessian is not positive definite even with damp={damp:g}"
        ) from None


def _check(weight: torch.Tensor, hessian: torch.Tensor, scheme: QScheme, block_size: int) -> None:
    if weight.dim() != 2 or tuple(hessian.shape) != (weight.shape[1],) * 2:
        raise CompactMLError(
            f"GPTQ needs a 2-D weight and a square Hessian of its column count; got weight "
            f"{tuple(weight.shape)} and Hessian {tuple(hessian.shape)}"
        )
    if isinstance(scheme.granularity, PerChannel) and scheme.granularity.axis not in (0, -2):
        raise CompactMLError("GPTQ needs per-row scales; use PerChannel(0) or PerGroup(size)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise CompactMLError(f"block_size must be a positive integer, got {block_size!r}")
    if not bool(torch.isfinite(weight).all() and torch.isfinite(hessian).all()):
        raise CompactMLError("the weight or the Hessian has NaN or Inf values; GPTQ cannot use it")
    affine.param_shape(tuple(weight.shape), scheme.granularity)  # group size must divide


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-tensor, per-row or per-group parameters as a new ``(rows, groups)`` tensor."""
    return (t.reshape(1, 1).expand(rows, 1) if t.dim() == 0 else t.reshape(rows, -1)).clone()


def _current(w, w1, err1, u, i1: int, i2: int, start: int, stop: int) -> torch.Tensor:
    """Error-updated weights of columns ``[start, stop)`` while block ``[i1, i2)`` is being
    quantized (columns past the block have not yet received this block's lazy update)."""
    inside = w1[:, start - i1 : min(stop, i2) - i1]
    if stop <= i2:
        return inside
    beyond = w[:, i2:stop] - err1 @ u[i1:i2, i2:stop]
    return torch.cat([inside, beyond], dim=1)


def _quantize_columns(
    w: torch.Tensor,
    u: torch.Tensor,
    scheme: QScheme,
    block_size: int,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_of: torch.Tensor,
    dynamic: int,
) -> torch.Tensor:
    """Codes of ``w`` (float, column by column, Algorithm 1). ``scale``/``zero`` are
    ``(rows, groups)``; column ``c`` uses group ``group_of[c]``; when ``dynamic`` (a group
    size) is non-zero, group ``c // dynamic`` is chosen when column ``c`` starts it."""
    rows, cols = w.shape
    codes, groups = torch.zeros_like(w), group_of.tolist()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            c = i1 + i
            if dynamic and c % dynamic == 0:
                group = _current(w, w1, err1, u, i1, i2, c, c + dynamic)
                s, z = affine.block_qparams(group, scheme)
                scale[:, c // dynamic] = s
                if zero is not None:
                    zero[:, c // dynamic] = z
            g = groups[c]
            s, z = scale[:, g], (None if zero is None else zero[:, g])
            code = affine.quantize_blocks(w1[:, i : i + 1], s, z, scheme)
            q = affine.dequantize_blocks(code, s, z, scheme)[:, 0]
            err = (w1[:, i] - q) / u1[i, i]
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1.0)
            err1[:, i] = err
            codes[:, c] = code[:, 0]
        w[:, i2:].sub_(err1 @ u[i1:i2, i2:])
    return codes


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QScheme,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> QWeight:
    """Quantize ``weight`` (``(rows, columns)``) with GPTQ against ``hessian``
    (``2 X^T X / n``, ``(columns, columns)``) under ``scheme``; see the module docstring.

    ``block_size``: columns per lazy batch update; ``damp``: fraction of ``mean(diag H)``
    added to the diagonal; ``act_order``: columns in descending ``diag(H)`` order.
    Raises ``torch.linalg.LinAlgError`` when the damped Hessian is not positive definite
    (the caller may retry with a larger ``damp``). Pure: the inputs are not changed.
    """
    _check(weight, hessian, scheme, block_size)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    grouped = isinstance(scheme.granularity, PerGroup)
    size = scheme.granularity.size if grouped else cols
    if grouped and not act_order:  # chosen as the columns are reached
        scale = torch.empty(rows, cols // size, device=w.device)
        zero = None
        if not scheme.symmetric:
            zero = torch.empty(rows, cols // size, dtype=torch.uint8, device=w.device)
    else:  # chosen up front from the original weights (static groups)
        s, z = affine.choose_qparams(w, scheme)
        scale, zero = _per_row(s, rows), (None if z is None else _per_row(z, rows))
    group_of = torch.arange(cols, device=w.device) // size
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        w, h, group_of = w[:, perm], h[perm][:, perm], group_of[perm]
    u = inverse_cholesky(h, damp)
    dynamic = size if grouped and not act_order else 0
    codes = _quantize_columns(w, u, scheme, block_size, scale, zero, group_of, dynamic)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    pshape = affine.param_shape((rows, cols), scheme.granularity)
    if not pshape:  # per-tensor: every row holds the same scale
        scale, zero = scale[0, 0], (None if zero is None else zero[0, 0])
    zero = None if zero is None else zero.reshape(pshape)
    return QWeight.from_codes(codes, scale.reshape(pshape), zero, scheme)


def _quant_linear(layer: nn.Linear, q: QWeight) -> QuantLinear:
    """A QuantLinear holding ``q`` and a copy of ``layer``'s bias."""
    return QuantLinear.from_qweight(q, layer.bias)


@dataclasses.dataclass(frozen=True)
class GPTQ(Technique):
    """GPTQ weight quantization of ``nn.Linear`` layers (Frantar et al. 2022), calibrated block
    by block on ``task.calib``; activations stay float.

    Args:
        bits: 2 to 8 bits per weight.
        group_size: weights per scale along each row (16, 32, 64, 128 or 256); None gives one
            scale per output channel.
        symmetric: zero point fixed at the middle code; False stores a uint8 zero per scale.
        damp: fraction of the Hessian's mean diagonal added to its diagonal. When the damped
            Hessian of a layer cannot be factorized, damp is multiplied by 10 and the layer
            retried (with a warning naming it), up to 4 tries; then it stays in float.
        act_order: quantize columns in descending order of their input energy ``diag(H)``
            (groups keep the original column order; see the module docstring).
        block_size: columns per lazy batch update (speed only; the result does not depend on it
            beyond float rounding).
        calib_batches: batches of ``task.calib`` to use (None: all of them).
        progress: show a progress bar over the blocks.
        include, exclude: fnmatch patterns on module names.

    The result holds the same ``QuantLinear`` layers as ``WeightOnly`` (so ``.cml`` saving and
    ONNX ``MatMulNBits`` export work unchanged); GPTQ only chooses the codes. Embedding and
    Conv2d layers are not touched. A layer whose calibration inputs were empty or held NaN/Inf,
    whose group size does not divide its width, or whose Hessian cannot be factorized stays in
    float, named in a warning and in the model's history.
    """

    family = "quantize"
    level = "bits"
    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    calib_batches: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        affine.weight_granularity(self.group_size)  # validates group_size
        check_bools(self, "symmetric", "act_order", "progress")
        damp = self.damp
        if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 < damp < 1:
            raise CompactMLError(f"damp must be a number between 0 and 1 (e.g. 0.01), got {damp!r}")
        check_positive_ints(self, "block_size", "calib_batches")
        self.scheme()  # validates bits

    def scheme(self) -> QScheme:
        """The :class:`QScheme` the codes are written in."""
        return QScheme(self.bits, self.symmetric, affine.weight_granularity(self.group_size))

    def _layers(self, model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, str]]:
        """The selected Linear layers GPTQ can quantize, and the others with the reason."""
        return quantizable_linears(self, model, self.scheme())

    def quantize_layer(self, name: str, weight: torch.Tensor, stats: HessianStats) -> QWeight:
        """GPTQ codes for one layer from its statistics; raising the damping on a failed
        factorization (with a warning naming ``name``). Raises CompactMLError when the
        statistics are unusable or every try fails."""
        problem = stats.problem()
        if problem:
            raise CompactMLError(problem)
        hessian = stats.hessian()
        q = with_damping(
            lambda damp: gptq_quantize(
                weight, hessian, self.scheme(), self.block_size, damp, self.act_order
            ),
            float(self.damp),
            "GPTQ",
            name,
        )
        if not bool(torch.isfinite(q.scale).all()):  # codes are integers: scales decide
            raise CompactMLError("GPTQ produced non-finite weights")
        return q

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A copy of ``model`` whose selected Linear layers hold GPTQ codes."""
        new = self.copy_model(model)
        layers, skipped = self._layers(new)
        changed: dict[str, QuantLinear] = {}

        def step(block: Block) -> None:
            mine = {name: m for name, m in block.named_modules() if name in layers}
            stats = collect(block, mine, lambda m: HessianStats(m.in_features))
            for name, layer in mine.items():
                try:
                    q = self.quantize_layer(name, layer.weight, stats[name])
                except CompactMLError as exc:
                    skipped[name] = str(exc)
                    continue
                changed[name] = _quant_linear(layer, q)
                if name:  # the model itself (a bare Linear) is replaced at the end
                    set_layer(new, name, changed[name])

        info = run_blockwise(new, task, step, self.calib_batches, self.progress, "GPTQ")
        if not changed:
            name, reason = next(iter(skipped.items()))
            raise CompactMLError(f"GPTQ could not quantize any layer; {name or 'model'}: {reason}")
        if "" in changed:
            new = set_layer(new, "", changed[""])
        warn_skipped(self, skipped)
        record(new, self, list(changed), skipped, details={"gptq": info})
        return new
