"""Activation observers: statistics gathered over calibration batches -> a clipping range.

Each observer sees the tensors of one activation (``observe(x)``, called once per batch) and
then chooses the real range ``[lo, hi]`` that the uint8 (or other) codes will cover
(``clip_range(bits)``); :meth:`Observer.qparams` turns it into a scale and a zero point with
:func:`compactml.quantize.act.act_qparams`, exactly what ONNX ``QuantizeLinear`` uses.

- ``minmax``: the smallest and largest value seen.
- ``percentile``: a percentile of both tails (``tails="both"``: the ``100 - p`` th and ``p`` th
  percentiles) or of ``|x|`` (``tails="abs"``: ``[-t, t]`` with ``t`` the ``p`` th percentile
  of ``|x|``, cut to the observed range).
- ``mse``: the range (the observed one shrunk by a factor) that minimises the expected
  quantization error over the histogram: clipped values cost their distance to the edge,
  values inside cost ``step**2 / 12`` (uniform rounding error).
- ``entropy``: the threshold minimising the KL divergence between the ``|x|`` histogram and its
  quantized version (TensorRT's calibrator: Migacz 2017, "8-bit Inference with TensorRT";
  also ONNX Runtime's entropy calibrator).

The histogram observers keep ``bins`` counts over a range that starts as the first batch's
``[min, max]`` and grows, when a later batch falls outside it, by an integer factor of the bin
width so old bins merge exactly into new ones (counts are never re-guessed).
"""

from __future__ import annotations

import abc
import math

import numpy as np
import torch

from compactml.errors import CompactMLError
from compactml.quantize.act import act_qparams, code_range

DEFAULT_BINS = 2048


class Observer(abc.ABC):
    """Accumulates statistics of one activation over batches and chooses its range."""

    @abc.abstractmethod
    def observe(self, x: torch.Tensor) -> None:
        """Add one batch of values (any shape; must be finite)."""

    @abc.abstractmethod
    def clip_range(self, bits: int = 8, signed: bool = False) -> tuple[float, float]:
        """The real range ``(lo, hi)`` to quantize over, for ``bits``-bit codes."""

    @property
    @abc.abstractmethod
    def seen(self) -> bool:
        """Whether any value has been observed."""

    def qparams(self, bits: int = 8, signed: bool = False) -> tuple[float, int]:
        """``(scale, zero_point)`` covering :meth:`clip_range` (see ``act_qparams``)."""
        if not self.seen:
            raise CompactMLError(
                "an activation observer saw no data; the calibration batches never reached this "
                "layer (check task.calib and the model's forward)"
            )
        return act_qparams(*self.clip_range(bits, signed), bits=bits, signed=signed)


def _values(x: torch.Tensor) -> np.ndarray:
    data = x.detach().float().reshape(-1).cpu().numpy().astype(np.float64)
    if data.size and not np.isfinite(data).all():
        raise CompactMLError("an observed activation is not finite (NaN or inf)")
    return data


class MinMaxObserver(Observer):
    """The running minimum and maximum."""

    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    @property
    def seen(self) -> bool:  # noqa: D102
        return self.lo <= self.hi

    def observe(self, x: torch.Tensor) -> None:  # noqa: D102
        data = _values(x)
        if data.size:
            self.lo, self.hi = min(self.lo, float(data.min())), max(self.hi, float(data.max()))

    def clip_range(self, bits: int = 8, signed: bool = False) -> tuple[float, float]:  # noqa: D102
        return self.lo, self.hi


class HistogramObserver(Observer):
    """A histogram of ``bins`` equal bins whose range grows with the data (see the module
    docstring); subclasses choose the range from it in :meth:`clip_range`."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16:
            raise CompactMLError(f"bins must be an integer >= 16, got {bins!r}")
        self.bins = bins
        self.counts = np.zeros(bins, np.float64)
        self.lo, self.width = 0.0, 0.0  # the histogram covers [lo, lo + bins * width]
        self.min, self.max = math.inf, -math.inf

    @property
    def seen(self) -> bool:  # noqa: D102
        return self.min <= self.max

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges."""
        return self.lo + self.width * np.arange(self.bins + 1)

    def _grow(self, a: float, b: float) -> None:
        """Widen the range to cover ``[a, b]``: bin width times an integer ``k``, start moved
        down by whole old bins, so old bin ``i`` lands in new bin ``(i + t) // k``."""
        w, n = self.width, self.bins
        t = max(0, math.ceil((self.lo - a) / w))
        new_lo = self.lo - t * w
        k = max(1, math.ceil((max(b, self.lo + n * w) - new_lo) / (n * w)))
        while new_lo + n * k * w < b:  # guard against float rounding
            k += 1
        merged = np.zeros(n, np.float64)
        np.add.at(merged, (np.arange(n) + t) // k, self.counts)
        self.counts, self.lo, self.width = merged, new_lo, w * k

    def observe(self, x: torch.Tensor) -> None:  # noqa: D102
        data = _values(x)
        if not data.size:
            return
        a, b = float(data.min()), float(data.max())
        if not self.seen:
            span = b - a if b > a else max(abs(a), 1e-8) * 1e-3
            self.lo, self.width = a, span / self.bins
        elif a < self.lo or b > self.lo + self.bins * self.width:
            self._grow(a, b)
        self.min, self.max = min(self.min, a), max(self.max, b)
        idx = np.clip(((data - self.lo) / self.width).astype(np.int64), 0, self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

    def clip_range(self, bits: int = 8, signed: bool = False) -> tuple[float, float]:
        """The observed range (subclasses choose a narrower one from the histogram)."""
        return self.min, self.max

    def centers(self) -> np.ndarray:
        """The bin centers."""
        return self.lo + self.width * (np.arange(self.bins) + 0.5)

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """``(counts, width)`` of ``|x|`` over ``bins`` bins from 0 to ``max|x|`` (each bin of
        the two-sided histogram moved whole, by its center)."""
        top = max(abs(self.min), abs(self.max), 1e-12)
        width = top / self.bins
        idx = np.clip((np.abs(self.centers()) / width).astype(np.int64), 0, self.bins - 1)
        return np.bincount(idx, weights=self.counts, minlength=self.bins), width


class PercentileObserver(HistogramObserver):
    """The ``percentile`` th percentile of both tails (``tails="both"``) or of ``|x|``
    (``tails="abs"``); 99.99 keeps all but one value in 10,000."""

    def __init__(self, percentile: float = 99.99, tails: str = "both", bins: int = DEFAULT_BINS):
        super().__init__(bins)
        if isinstance(percentile, bool) or not isinstance(percentile, int | float):
            raise CompactMLError(f"percentile must be a number such as 99.99, got {percentile!r}")
        if not 50.0 < percentile <= 100.0:
            raise CompactMLError(f"percentile must be in (50, 100], got {percentile}")
        if tails not in ("both", "abs"):
            raise CompactMLError(f"tails must be 'both' or 'abs', got {tails!r}")
        self.percentile, self.tails = float(percentile), tails

    def clip_range(self, bits: int = 8, signed: bool = False) -> tuple[float, float]:  # noqa: D102
        q = self.percentile / 100.0
        if self.tails == "abs":
            counts, width = self.abs_histogram()
            cdf = np.cumsum(counts) / counts.sum()
            t = (int(np.searchsorted(cdf, q)) + 1) * width
            return max(self.min, -t), min(self.max, t)
        cdf = np.cumsum(self.counts) / self.counts.sum()
        edges = self.edges
        lo = edges[int(np.searchsorted(cdf, 1.0 - q, side="right"))]
        hi = edges[min(int(np.searchsorted(cdf, q)) + 1, self.bins)]
        return max(self.min, float(lo)), min(self.max, float(hi))


class MSEObserver(HistogramObserver):
    """The range ``alpha * [min, max]`` (``steps`` values of alpha from 1 down to
    ``min_ratio``) with the least expected squared quantization error over the histogram."""

    def __init__(self, steps: int = 200, min_ratio: float = 0.05, bins: int = DEFAULT_BINS):
        super().__init__(bins)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise CompactMLError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, int | float):
            raise CompactMLError(f"min_ratio must be a number in (0, 1], got {min_ratio!r}")
        if not 0.0 < min_ratio <= 1.0:
            raise CompactMLError(f"min_ratio must be in (0, 1], got {min_ratio}")
        self.steps, self.min_ratio = steps, float(min_ratio)

    def error(self, lo: float, hi: float, bits: int, signed: bool) -> float:
        """Expected squared error (summed over the histogram) of quantizing to ``[lo, hi]``."""
        scale, zero = act_qparams(lo, hi, bits, signed)
        qmin, qmax = code_range(bits, signed)
        low, high = (qmin - zero) * scale, (qmax - zero) * scale
        c = self.centers()
        clipped = np.where(c < low, low - c, np.where(c > high, c - high, 0.0))
        inside = (c >= low) & (c <= high)
        return float(np.sum(self.counts * (clipped**2 + inside * scale**2 / 12.0)))

    def clip_range(self, bits: int = 8, signed: bool = False) -> tuple[float, float]:  # noqa: D102
        best, best_err = (self.min, self.max), math.inf
        for alpha in np.linspace(1.0, self.min_ratio, self.steps):
            lo, hi = self.min * alpha, self.max * alpha
            err = self.error(lo, hi, bits, signed)
            if err < best_err:
                best, best_err = (float(lo), float(hi)), err
        return best


def kl_threshold_bin(counts: np.ndarray, levels: int) -> int:
    """The number of leading bins ``i`` (``levels <= i <= len(counts)``) whose quantization to
    ``levels`` levels loses the least information: TensorRT's KL-divergence search.

    For each ``i``: P is ``counts[:i]`` with everything beyond folded into its last bin; Q
    merges ``counts[:i]`` into ``levels`` chunks and spreads each chunk's total evenly over
    the bins where P is non-empty (P, outliers included, as TensorRT and ONNX Runtime do); the
    cost is ``KL(P || Q)`` of the normalized distributions.
    """
    counts = np.asarray(counts, np.float64)
    n = len(counts)
    if n <= levels:
        return n
    tail = np.cumsum(counts[::-1])[::-1]  # tail[i] = sum(counts[i:])
    best_i, best_kl = n, math.inf
    for i in range(levels, n + 1):
        p = counts[:i].copy()
        if i < n:
            p[-1] += tail[i]
        starts = (np.arange(levels) * i) // levels
        nonzero = (p > 0).astype(np.float64)
        totals = np.add.reduceat(counts[:i], starts)
        filled = np.add.reduceat(nonzero, starts)
        per = np.divide(totals, filled, out=np.zeros_like(totals), where=filled > 0)
        q = np.repeat(per, np.diff(np.append(starts, i))) * nonzero
        mask = p > 0
        if p.sum() <= 0 or q.sum() <= 0:
            continue
        pn, qn = p / p.sum(), q / q.sum()
        qn = np.where(mask & (qn <= 0), 1e-12, qn)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def coarsen(counts: np.ndarray, stride: int) -> np.ndarray:
    """``counts`` summed over runs of ``stride`` bins, padded with empty bins to a whole number
    of runs so the last bins (the largest values) are kept where they are."""
    pad = -len(counts) % stride
    padded = np.concatenate([np.asarray(counts, np.float64), np.zeros(pad)])
    return padded.reshape(-1, stride).sum(1)


class EntropyObserver(HistogramObserver):
    """KL-divergence calibration (TensorRT): the threshold ``t`` on ``|x|`` whose quantized
    histogram is closest to the observed one; the range is ``[-t, t]`` cut to the observed one.
    Non-negative activations (after ReLU) use all ``2**bits - 1`` levels on ``[0, t]`` and leave
    the first bin (the ReLU zeros, exact at zero point 0 for any ``t``) out of the divergence;
    others use half of the levels per side. ``stride`` tries every ``stride`` th threshold
    (faster)."""

    def __init__(self, bins: int = DEFAULT_BINS, stride: int = 1) -> None:
        super().__init__(bins)
        self.stride = max(1, int(stride))

    def clip_range(self, bits: int = 8, signed: bool = False) -> tuple[float, float]:  # noqa: D102
        counts, width = self.abs_histogram()
        levels = (1 << bits) - 1 if self.min >= 0 else 1 << (bits - 1)
        if self.min >= 0:  # the spike of ReLU zeros is exact at zero point 0 whatever the range
            counts = np.concatenate([[0.0], counts[1:]])
        if self.stride > 1:
            counts, width = coarsen(counts, self.stride), width * self.stride
        t = kl_threshold_bin(counts, levels) * width
        return max(self.min, -t), min(self.max, t)


#: Observer names (as ``Static(observer=...)`` takes them) -> classes.
OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, **kwargs: object) -> Observer:
    """A new observer called ``name`` (a key of :data:`OBSERVERS`) built with ``kwargs``."""
    cls = OBSERVERS.get(name)
    if cls is None:
        raise CompactMLError(f"unknown observer {name!r}; use one of {', '.join(OBSERVERS)}")
    return cls(**kwargs)
