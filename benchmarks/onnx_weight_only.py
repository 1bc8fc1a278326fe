"""MiniLM in ONNX Runtime: fp32 against 4-bit group-32 weight-only (MatMulNBits).

All in one process, 2 intra-op threads, CPU execution provider, ORT_ENABLE_ALL: latency at
1x128 and 8x128 tokens (real docstring text, truncated/padded to 128 tokens, full attention
mask), cosine fidelity of the ONNX Runtime outputs against fp32 PyTorch, and ONNX file sizes.
Sessions are timed in interleaved rounds so that load on the machine hits all of them alike.

Run ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_weight_only.py`` (about 3 minutes on
2 cores); writes ``benchmarks/results/onnx_weight_only.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from compactml.examples import minilm
from compactml.examples.docstrings import docstring_splits
from compactml.export import ort as cort
from compactml.export.onnx import export
from compactml.io import atomic_write_text
from compactml.quantize import WeightOnly, quantize

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_weight_only.json"
SEQ = 128


def token_batch(batch: int, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """``batch`` docstring texts (several joined, so each fills ``seq`` tokens) as inputs."""
    texts = docstring_splits().calib
    joined = [" ".join(texts[i * 8 : i * 8 + 8]) for i in range(batch)]
    enc = minilm.tokenizer()(
        joined, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"
    )
    return {key: enc[key] for key in ("input_ids", "attention_mask", "token_type_ids")}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows."""
    num = (a * b).sum(axis=1)
    return float((num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def compare_onnx_latency(
    threads: int = 2, batches: tuple[int, ...] = (1, 8), rounds: int = 3, repeats: int = 10
) -> dict:
    """Export MiniLM fp32 and 4-bit g32 (symmetric; accuracy levels 0 and 4; and ``clip="mse"``)
    and measure latency (ms), cosine fidelity against fp32 PyTorch, and file sizes (bytes)."""
    model, task = minilm.load(limit=16, progress=False)
    variants = {
        "fp32": (model, 0),
        "int4_g32": (quantize(model, WeightOnly(bits=4, group_size=32)), 0),
        "int4_g32_acc4": (quantize(model, WeightOnly(bits=4, group_size=32)), 4),
        "int4_g32_mse": (quantize(model, WeightOnly(bits=4, group_size=32, clip="mse")), 0),
    }
    inputs = {b: token_batch(b) for b in batches}
    with torch.no_grad():
        reference = model(**inputs[max(batches)]).numpy()
    results: dict = {}
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (variant, level) in variants.items():
            path = export(variant, Path(folder) / f"{name}.onnx", task.example_input(),
                          accuracy_level=level)  # fmt: skip
            sessions[name] = cort.session(path, threads=threads)
            out = cort.run(sessions[name], inputs[max(batches)])[0]
            results[name] = {
                "onnx_bytes": path.stat().st_size,
                "accuracy_level": level,
                "cosine_vs_fp32_pytorch": cosine(out, reference),
                "latency": {},
            }
        for b in batches:
            medians: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(rounds):
                for name, sess in sessions.items():
                    stats = cort.latency(sess, inputs[b], repeats=repeats, warmup=2)
                    medians[name].append(stats["median_ms"])
            for name in sessions:
                results[name]["latency"][f"{b}x{SEQ}"] = {
                    "median_ms": statistics.median(medians[name]),
                    "round_medians_ms": medians[name],
                }
    settings = cort.session_settings(next(iter(sessions.values())))
    return {"settings": settings, "repeats_per_round": repeats, "variants": results}


def main() -> None:
    """Run the comparison and write the JSON result."""
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_threads_available": torch.get_num_threads(),
        },
        "minilm": compare_onnx_latency(),
    }
    atomic_write_text(RESULTS, json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
