"""Baselines of the built-in models: size as stored, MACs, latency, memory, quality.

Every later benchmark compares against these numbers. Run with
``.venv/bin/python benchmarks/baselines.py`` (about a minute on 2 cores); writes
``benchmarks/results/baselines.json``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

import compactml as cml
from compactml.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "baselines.json"


def measure(name: str, target: str) -> dict:
    """Load a built-in model, profile it against ``target`` and evaluate it."""
    start = time.perf_counter()
    model, task = cml.examples.load(name)
    load_s = time.perf_counter() - start
    prof = cml.profile(model, task.example_input(), target=target, repeats=50).to_dict()
    start = time.perf_counter()
    metrics = dict(cml.evaluate(model, task))
    eval_s = time.perf_counter() - start
    prof.pop("layers")
    return {"load_s": load_s, "eval_s": eval_s, "profile": prof, "metrics": metrics}


def main() -> None:
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "digits-cnn": measure("digits-cnn", "stm32f746"),
        "minilm": measure("minilm", "raspberry-pi-4"),
    }
    atomic_write_text(RESULTS, json.dumps(results, indent=2, sort_keys=True) + "\n")
    for name in ("digits-cnn", "minilm"):
        r = results[name]
        p, m = r["profile"], r["metrics"]
        quality = {k: m[k] for k in ("top1", "ece", "mrr", "recall@1", "cosine_fidelity") if k in m}
        print(
            f"{name}: {p['stored_bytes']} bytes stored, {p['macs']} MACs, "
            f"latency {p['latency']['median_ms']:.3f} ms, peak act {p['peak_activation_bytes']} B, "
            f"quality {quality}"
        )
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
