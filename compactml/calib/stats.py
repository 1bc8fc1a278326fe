"""Statistics of a layer's inputs, accumulated over calibration tokens.

Each accumulator sees the input ``x`` of one layer on every call (any shape whose last
dimension is the layer's input width; every other dimension counts as tokens) and keeps only
a fixed-size summary, so memory does not grow with the calibration data:

- :class:`HessianStats`: ``H = 2 X^T X / n`` over the ``n`` tokens, the Hessian of the layer's
  squared output error that GPTQ (Frantar et al. 2022) and SparseGPT (Frantar and Alistarh
  2023) solve against;
- :class:`ChannelStats`: per input channel sum of squares (Wanda's ``||X_j||_2``, Sun et al.
  2023), mean absolute value (AWQ's activation scale, Lin et al. 2023), minimum and maximum.

An input holding NaN or Inf makes the sums non-finite (a channel's sum of squares
``sum x_j^2`` is NaN or Inf as soon as one ``x_j`` is), which :meth:`problem` detects on the
small summary rather than on every input, so the method leaves that layer as it was instead
of writing NaN weights. An accumulator that saw no tokens also has a problem ("never received
input").
"""

from __future__ import annotations

import torch

from compactml.errors import CompactMLError


def _tokens(x: torch.Tensor, columns: int) -> torch.Tensor:
    """``x`` as a float32 ``(tokens, columns)`` matrix."""
    if x.shape[-1] != columns:
        raise CompactMLError(
            f"a layer with {columns} input features received an input of shape "
            f"{tuple(x.shape)}; the calibration batches do not fit the model"
        )
    return x.detach().reshape(-1, columns).float()


class _Accumulator:
    """Token count and the checks shared by the accumulators."""

    def __init__(self, columns: int) -> None:
        self.columns = int(columns)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the tokens of one input ``x`` (``(..., columns)``)."""
        rows = _tokens(x, self.columns)
        if rows.shape[0]:
            self._add(rows)
            self.tokens += rows.shape[0]

    def _add(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _sums(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def finite(self) -> bool:
        """Whether every input so far was finite (and no sum overflowed)."""
        return all(bool(torch.isfinite(t).all()) for t in self._sums())

    def problem(self) -> str | None:
        """Why these statistics cannot be used (None when they can)."""
        if not self.tokens:
            return "it never received input from the calibration batches"
        if not self.finite:
            return "its calibration inputs contain NaN or Inf"
        return None


class HessianStats(_Accumulator):
    """``H = 2 X^T X / n``: ``X`` is the ``(n, columns)`` matrix of every input token seen
    (the paper's ``2 X X^T`` with tokens as columns). Kept as a float32 running sum."""

    def __init__(self, columns: int) -> None:
        super().__init__(columns)
        self.sum = torch.zeros(self.columns, self.columns)

    def _add(self, rows: torch.Tensor) -> None:
        self.sum = self.sum.to(rows.device)
        self.sum.addmm_(rows.T, rows)

    def _sums(self) -> tuple[torch.Tensor, ...]:
        return (self.sum.diagonal(),)

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` as a new ``(columns, columns)`` float32 tensor."""
        return self.sum * (2.0 / max(self.tokens, 1))


class ChannelStats(_Accumulator):
    """Per input channel: sum of squares, sum of absolute values, minimum and maximum."""

    def __init__(self, columns: int) -> None:
        super().__init__(columns)
        self.sum_sq = torch.zeros(self.columns)
        self.sum_abs = torch.zeros(self.columns)
        self.min = torch.full((self.columns,), float("inf"))
        self.max = torch.full((self.columns,), float("-inf"))

    def _add(self, rows: torch.Tensor) -> None:
        device = rows.device
        self.sum_sq = self.sum_sq.to(device) + rows.square().sum(dim=0)
        self.sum_abs = self.sum_abs.to(device) + rows.abs().sum(dim=0)
        self.min = torch.minimum(self.min.to(device), rows.amin(dim=0))
        self.max = torch.maximum(self.max.to(device), rows.amax(dim=0))

    def _sums(self) -> tuple[torch.Tensor, ...]:
        return (self.sum_sq,)

    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` per input channel ``j`` over all tokens (Wanda's activation norm)."""
        return self.sum_sq.sqrt()

    def mean_abs(self) -> torch.Tensor:
        """Mean ``|x_j|`` per input channel over all tokens (AWQ's activation scale)."""
        return self.sum_abs / max(self.tokens, 1)
