"""MiniLM in ONNX Runtime: fp32 against 4-bit group-32 weight-only (MatMulNBits).

All in one process, 2 intra-op threads, CPU execution provider, ORT_ENABLE_ALL: latency at
1x128 and 8x128 tokens (real docstring text, several joined so each fills 128 tokens, full
attention mask), cosine fidelity of the ONNX Runtime outputs against fp32 PyTorch, and ONNX file
sizes. Sessions are timed in interleaved rounds (see ``benchmarks/common.py``).

:func:`token_batch` is also used by ``benchmarks/dynamic_int8.py`` and
``benchmarks/quantization.py``. Run ``HF_HUB_OFFLINE=1 .venv/bin/python
benchmarks/onnx_weight_only.py`` (about 2 minutes on 2 cores); writes
``benchmarks/results/onnx_weight_only.json``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from common import THREADS, add_speedups, interleaved, machine_info, ort_timer, write_results

from compactml.examples import minilm
from compactml.examples.docstrings import docstring_splits
from compactml.export import ort as cort
from compactml.export.onnx import export
from compactml.quantize import WeightOnly, quantize

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
    batches: tuple[int, ...] = (1, 8), rounds: int = 3, repeats: int = 10
) -> dict:
    """Export MiniLM fp32 and 4-bit g32 (symmetric; accuracy levels 0 and 4; and ``clip="mse"``)
    and measure latency (ms), cosine fidelity against fp32 PyTorch, and file sizes (bytes)."""
    model, task = minilm.load(limit=16, progress=False)
    int4, int4_mse = (
        quantize(model, WeightOnly(bits=4, group_size=32, clip=clip)) for clip in ("none", "mse")
    )
    variants = {
        "fp32": (model, 0),
        "int4_g32": (int4, 0),
        "int4_g32_acc4": (int4, 4),
        "int4_g32_mse": (int4_mse, 0),
    }
    inputs = {f"{b}x{SEQ}": token_batch(b) for b in batches}
    with torch.no_grad():
        reference = model(**inputs[f"{max(batches)}x{SEQ}"]).numpy()
    results: dict = {}
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (variant, level) in variants.items():
            path = export(variant, Path(folder) / f"{name}.onnx", task.example_input(),
                          accuracy_level=level)  # fmt: skip
            sessions[name] = cort.session(path, THREADS)
            out = cort.run(sessions[name], inputs[f"{max(batches)}x{SEQ}"])[0]
            results[name] = {
                "onnx_bytes": path.stat().st_size,
                "accuracy_level": level,
                "cosine_vs_fp32_pytorch": cosine(out, reference),
            }
        latency = {}
        for size, x in inputs.items():
            latency[size] = interleaved(
                {n: ort_timer(s, x, repeats) for n, s in sessions.items()}, rounds
            )
            add_speedups(latency[size], "fp32")
    settings = cort.session_settings(next(iter(sessions.values())))
    return {"settings": settings, "repeats_per_round": repeats, "variants": results,
            "latency": latency}  # fmt: skip


def main() -> None:
    """Run the comparison and write the JSON result."""
    torch.set_num_threads(THREADS)
    results = {"machine": machine_info(), "minilm": compare_onnx_latency()}
    print(f"written to {write_results('onnx_weight_only', results)}")


if __name__ == "__main__":
    main()
