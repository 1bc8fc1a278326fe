"""``SparseGPT`` and ``Wanda``: pruning configs that read the layers' calibration inputs.

Magnitude pruning ranks a weight by ``|w|`` alone; in language models a few input features
carry activations orders of magnitude larger than the rest, so a small weight on such a
feature matters more than a large one elsewhere. Wanda (Sun et al. 2023) ranks by
``|w| * ||x_j||``; SparseGPT (Frantar and Alistarh 2023) also updates the weights it keeps
to absorb the error of the ones it removes, through the Hessian ``2 X^T X / n``. The math is
in :mod:`compactml.prune.sparsegpt`; these configs gather each layer's statistics block by
block (:func:`compactml.calib.capture.run_blockwise`: the inputs of block ``k`` come from
blocks ``< k`` already pruned, as in both papers) and write the result as ordinary masks.

A pruned layer keeps its type and shape: its weight holds the new values (SparseGPT's
updated weights, zero where pruned) and a ``weight_mask`` buffer (:mod:`compactml.prune.masks`)
records the pattern, exactly as after ``Magnitude`` or ``NM``, so ``.cml`` saving (sparse
encodings), ``sparsity()``, fine-tuning with masks kept and ONNX export work unchanged.
"""

from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from compactml.calib.capture import Block, collect, run_blockwise
from compactml.calib.layers import select_linears
from compactml.calib.stats import ChannelStats, HessianStats
from compactml.config import Technique, check_bools, check_positive_ints, record
from compactml.errors import CompactMLError
from compactml.prune.criteria import check_sparsity
from compactml.prune.masks import attach_mask, sparsity
from compactml.prune.sparsegpt import sparsegpt_prune, wanda_prune
from compactml.quantize.gptq import with_damping
from compactml.task import Task


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Calibrated(Technique):
    """Fields, validation and the block-by-block plumbing shared by SparseGPT and Wanda.

    The pattern is either unstructured (``sparsity``) or N:M (``n`` and ``m``), never both:
    giving both is an error rather than one silently winning. With neither, ``sparsity`` is
    0.5, so ``SparseGPT()`` is the papers' 50% setting and ``cfg.sparsity`` reads 0.5 (it is
    None exactly when the config is N:M).
    """

    family: ClassVar[str] = "prune"
    level: ClassVar[str | None] = "sparsity"
    #: The input statistics the method reads (built per layer with its input width).
    statistics: ClassVar[type[HessianStats] | type[ChannelStats]]
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    calib_batches: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        who = type(self).__name__
        if (self.n is None) != (self.m is None):
            raise CompactMLError(
                f"{who} N:M needs both n and m (e.g. n=2, m=4), got n={self.n!r}, m={self.m!r}"
            )
        if self.n is not None:
            if self.sparsity is not None:
                raise CompactMLError(
                    f"{who} got sparsity={self.sparsity!r} and n={self.n!r}, m={self.m!r}; give "
                    "sparsity= for unstructured pruning or n= and m= for N:M, not both"
                )
            check_positive_ints(self, "n", "m")
            if self.n > self.m:
                raise CompactMLError(
                    f"{who} n={self.n} is greater than m={self.m}; n weights are kept in every "
                    "m, so use n <= m (e.g. n=2, m=4)"
                )
        elif self.sparsity is None:
            object.__setattr__(self, "sparsity", 0.5)
        else:
            check_sparsity(self.sparsity)
        check_positive_ints(self, "calib_batches")
        check_bools(self, "progress")

    def pattern(self) -> dict[str, Any]:
        """The pattern as keyword arguments of the pure functions: ``{"sparsity": s}`` or
        ``{"n": n, "m": m}``."""
        if self.n is not None:
            return {"n": self.n, "m": self.m}
        return {"sparsity": self.sparsity}

    def _layers(self, model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, str]]:
        """The selected Linear layers that can be pruned, and the others with the reason."""

        def check(layer: nn.Linear) -> str | None:
            if self.m is not None and layer.in_features % self.m:
                return f"input width {layer.in_features} is not divisible by m={self.m}"
            return None

        return select_linears(
            self, model, verb="pruned", instead="use Magnitude or NM for convolutions", check=check
        )

    @abc.abstractmethod
    def solve(
        self, name: str, weight: torch.Tensor, stats: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new weight, keep mask)`` of the layer ``name`` from its usable statistics."""

    def prune_layer(
        self, name: str, weight: torch.Tensor, stats: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(new weight, keep mask)`` for one layer. Raises CompactMLError when its
        statistics are empty or non-finite, or the result is not finite (the layer then stays
        as it was: no NaN is ever written)."""
        problem = stats.problem()
        if problem:
            raise CompactMLError(problem)
        new, keep = self.solve(name, weight, stats)
        if not bool(torch.isfinite(new).all()):
            raise CompactMLError(f"{type(self).__name__} produced non-finite weights")
        return new, keep

    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """A copy of ``model`` whose selected Linear layers are pruned, with a mask buffer
        each; ``model`` is unchanged."""
        new = self.copy_model(model)
        layers, skipped = self._layers(new)
        changed: list[str] = []
        who = type(self).__name__

        def step(block: Block) -> None:
            mine = {name: m for name, m in block.named_modules() if name in layers}
            stats = collect(block, mine, lambda m: self.statistics(m.in_features))
            for name, layer in mine.items():
                try:
                    weight, keep = self.prune_layer(name, layer.weight, stats[name])
                except CompactMLError as exc:
                    skipped[name] = str(exc)
                    continue
                with torch.no_grad():
                    layer.weight.copy_(weight)
                attach_mask(layer, keep)
                changed.append(name)

        info = run_blockwise(new, task, step, self.calib_batches, self.progress, who)
        if not changed:
            name, reason = next(iter(skipped.items()))
            raise CompactMLError(f"{who} could not prune any layer; {name or 'model'}: {reason}")
        if skipped:
            listed = "; ".join(f"{name or 'model'}: {why}" for name, why in skipped.items())
            warnings.warn(f"{who} left {len(skipped)} layer(s) unpruned: {listed}", stacklevel=3)
        report = sparsity(new)
        shares = {name: round(report.layers[name], 6) for name in changed}
        record(new, self, changed, skipped, {"sparsity": shares, "calibration": info})
        return new


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPT(_Calibrated):
    """SparseGPT (Frantar and Alistarh 2023): prune each ``nn.Linear`` and update its
    remaining weights so its output on the calibration data changes as little as possible.

    A method for transformers and other stacks of Linear layers: only ``nn.Linear`` layers
    are pruned (convolutions and embeddings are left alone; use Magnitude or NM for them).
    Layers are calibrated block by block on ``task.calib``.

    Args:
        sparsity: share of each layer's weights removed, in [0, 1) (0.5 when neither
            ``sparsity`` nor ``n``/``m`` is given); the mask is chosen per block of
            ``block_size`` columns over all rows (the paper's adaptive mask selection), or
        n, m: N:M, keep ``n`` of every ``m`` consecutive input weights of a row (2:4, 4:8);
            layers whose input width ``m`` does not divide are left alone. Not with sparsity.
        block_size: columns pruned together (lazy batch updates); a multiple of ``m``.
        damp: fraction of the Hessian's mean diagonal added to its diagonal. When the damped
            Hessian of a layer cannot be factorized, damp is multiplied by 10 and the layer
            retried (with a warning naming it), up to 4 tries; then it stays as it was.
        calib_batches: batches of ``task.calib`` to use (None: all of them).
        progress: show a progress bar over the blocks.
        include, exclude: fnmatch patterns on module names.

    A layer whose calibration inputs were empty or held NaN/Inf, whose weight is not finite,
    or whose input width ``m`` does not divide stays as it was, named in a warning and in the
    model's history. Weights masked before (a model pruned earlier) stay pruned.
    """

    statistics: ClassVar[type[HessianStats]] = HessianStats
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_ints(self, "block_size")
        if self.m is not None and self.block_size % self.m:
            raise CompactMLError(
                f"SparseGPT block_size={self.block_size} is not a multiple of m={self.m}; "
                f"use a block_size such as {self.m * max(1, 128 // self.m)}"
            )
        damp = self.damp
        if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 < damp < 1:
            raise CompactMLError(f"damp must be a number between 0 and 1 (e.g. 0.01), got {damp!r}")

    def solve(
        self, name: str, weight: torch.Tensor, stats: HessianStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseGPT against the layer's Hessian, raising the damping when it must."""
        hessian = stats.hessian()
        return with_damping(
            lambda damp: sparsegpt_prune(
                weight, hessian, **self.pattern(), block_size=self.block_size, damp=damp
            ),
            float(self.damp),
            "SparseGPT",
            name,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wanda(_Calibrated):
    """Wanda (Sun et al. 2023): remove the weights of lowest ``|w_ij| * ||x_j||`` in each output
    row of every ``nn.Linear``, where ``||x_j||`` is the norm of input feature ``j`` over the
    calibration tokens. No weight update: cheaper than SparseGPT, and the kept weights keep
    their values.

    A method for transformers and other stacks of Linear layers: only ``nn.Linear`` layers
    are pruned (use Magnitude or NM for convolutions). Layers are calibrated block by block on
    ``task.calib``.

    Args:
        sparsity: share of each output row's weights removed, in [0, 1) (0.5 when neither
            ``sparsity`` nor ``n``/``m`` is given), or
        n, m: N:M, keep ``n`` of every ``m`` consecutive input weights of a row (2:4, 4:8);
            layers whose input width ``m`` does not divide are left alone. Not with sparsity.
        calib_batches: batches of ``task.calib`` to use (None: all of them).
        progress: show a progress bar over the blocks.
        include, exclude: fnmatch patterns on module names.

    Layers with empty or non-finite statistics or weights stay as they were, named in a
    warning and in the model's history, as for :class:`SparseGPT`.
    """

    statistics: ClassVar[type[ChannelStats]] = ChannelStats

    def solve(
        self, name: str, weight: torch.Tensor, stats: ChannelStats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Wanda's scores with the layer's input norms."""
        return wanda_prune(weight, stats.norm().to(weight.device), **self.pattern())
