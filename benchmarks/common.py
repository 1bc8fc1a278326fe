"""Helpers shared by the benchmark scripts: machine description, interleaved timing, speed-up
ratios, an ONNX Runtime session wrapped as a module for ``compactml.evaluate``, JSON output.

Timing: every variant is timed once per round, rounds are interleaved (round 1 of every
variant, then round 2...) so that other load on the machine hits every variant alike; each
round is the median of ``repeats`` runs after warm-up, and the figure reported is the median of
the round medians (``best_round_ms``, the fastest round, is also kept: it is what other
processes disturb least). Speed-ups are ratios within the same process: base / variant.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from torch import nn

from compactml.export import ort as cort
from compactml.io import atomic_write_text
from compactml.task import call_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
THREADS = 2


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int = THREADS) -> dict[str, Any]:
    """Versions, CPU and thread settings, recorded with every result."""
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "avx512_vnni": "avx512_vnni" in flags,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "intra_op_threads": threads,
        "torch_threads": torch.get_num_threads(),
    }


def ort_timer(sess: Any, inputs: Any, repeats: int, warmup: int = 3) -> Callable[[], float]:
    """A function returning the median latency (ms) of ``repeats`` runs of ``sess``."""
    return lambda: cort.latency(sess, inputs, repeats=repeats, warmup=warmup)["median_ms"]


def torch_timer(
    model: nn.Module, inputs: Any, repeats: int, warmup: int = 3
) -> Callable[[], float]:
    """A function returning the median latency (ms) of ``repeats`` PyTorch forwards (no grad)."""

    def timer() -> float:
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                call_model(model, inputs)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(times)

    return timer


def interleaved(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, dict]:
    """Run every timer once per round for ``rounds`` rounds; per timer the median of the round
    medians (``median_ms``), the fastest round (``best_round_ms``) and every round."""
    found: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            found[name].append(timer())
    return {
        name: {"median_ms": statistics.median(v), "best_round_ms": min(v), "round_medians_ms": v}
        for name, v in found.items()
    }


def add_speedups(latency: dict[str, dict], base: str, names: list[str] | None = None) -> None:
    """Add ``speedup_vs_<base>`` (base median / variant median, > 1 is faster),
    ``best_round_speedup_vs_<base>`` and ``paired_speedup_vs_<base>`` (the median over rounds
    of the ratio within each round: a burst of load on a shared machine slows both sides of
    one round, so this one moves least) to each of ``names`` (default: all) in place."""
    ref = latency[base]
    for name in names or list(latency):
        stats = latency[name]
        stats[f"speedup_vs_{base}"] = ref["median_ms"] / stats["median_ms"]
        stats[f"best_round_speedup_vs_{base}"] = ref["best_round_ms"] / stats["best_round_ms"]
        pairs = zip(ref["round_medians_ms"], stats["round_medians_ms"], strict=True)
        stats[f"paired_speedup_vs_{base}"] = statistics.median(b / v for b, v in pairs)


class OrtModule(nn.Module):
    """An ONNX Runtime session as a module, so ``compactml.evaluate`` scores the exported model
    exactly as it scores the PyTorch one. Inputs are given positionally or by keyword, as to
    ``export``'s example input; returns the first output as a float tensor."""

    def __init__(self, sess: Any) -> None:
        super().__init__()
        self.sess = sess

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The session's first output for these inputs."""
        inputs = kwargs if kwargs else (args[0] if len(args) == 1 else tuple(args))
        return torch.from_numpy(cort.run(self.sess, inputs)[0])


def recorded_warnings(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``fn()`` and the distinct first lines of the warnings it raised (e.g. layers kept in
    float), so the report names them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    lines = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, UserWarning)]
    return value, list(dict.fromkeys(lines))


def write_results(name: str, results: dict) -> Path:
    """Write ``results`` as indented JSON to ``benchmarks/results/<name>.json`` atomically."""
    path = RESULTS_DIR / f"{name}.json"
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    return path
