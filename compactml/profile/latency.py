"""Latency in PyTorch eager mode on the CPU: warm-up runs, then timed runs, median and spread.

Each timed run is one call of the model on the example input under ``torch.inference_mode``
with the model in eval mode, timed with ``time.perf_counter``. The thread count is recorded
(and can be pinned for the measurement); the model's train/eval flags and torch's thread count
are restored afterwards. This is the reference runtime's latency; exported runtimes (ONNX
Runtime, TFLite Micro) are measured by their own exporters.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.task import batch_size, call_model, eval_mode

RUNTIME = "pytorch-eager"


@dataclass(frozen=True)
class Latency:
    """Latency of one model call in milliseconds: median, 10th and 90th percentiles.

    ``repeats`` timed runs followed ``warmup`` untimed ones, on ``threads`` CPU threads, for an
    input of ``batch_size`` samples, in ``runtime``.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    threads: int
    batch_size: int
    runtime: str = RUNTIME

    def to_dict(self) -> dict:
        """The JSON-able form used by ``Profile.to_dict()["latency"]``."""
        return asdict(self)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Use ``threads`` intra-op CPU threads in the block (None: leave as is); yields the count."""
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise CompactMLError(
                f"threads must be at least 1, got {threads}; pass threads=1 or more"
            )
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear between closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _synchronize(model: nn.Module) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: nn.Module,
    inputs: Any,
    repeats: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> Latency:
    """Time ``repeats`` calls of ``model(inputs)`` after ``warmup`` untimed ones (milliseconds)."""
    if repeats < 1 or warmup < 0:
        raise CompactMLError(
            f"latency needs repeats >= 1 and warmup >= 0, got repeats={repeats}, "
            f"warmup={warmup}; pass e.g. repeats=30, warmup=5"
        )
    times_ms = []
    with eval_mode(model), torch_threads(threads) as used_threads, torch.inference_mode():
        for _ in range(warmup):
            call_model(model, inputs)
        _synchronize(model)
        for _ in range(repeats):
            start = time.perf_counter()
            call_model(model, inputs)
            _synchronize(model)
            times_ms.append((time.perf_counter() - start) * 1000.0)
    return Latency(
        median_ms=statistics.median(times_ms),
        p10_ms=percentile(times_ms, 10),
        p90_ms=percentile(times_ms, 90),
        repeats=repeats,
        warmup=warmup,
        threads=used_threads,
        batch_size=batch_size(inputs),
    )
