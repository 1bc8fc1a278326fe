"""MiniLM dynamic INT8 in ONNX Runtime: compactml ``Dynamic`` against fp32 and the peers.

All in one process, 2 intra-op threads, CPU execution provider, ORT_ENABLE_ALL. Every ONNX file
is exported by ``compactml.export.onnx.export`` with a dict input (random ``input_ids`` in the
vocabulary, ``attention_mask`` of ones). Variants:

- ``fp32``: the float model; ``compactml_dynamic``: ``Dynamic(bits=8)`` (per-token uint8
  activations, int8 per-channel weights; :mod:`compactml.export.onnx_dynamic`);
- ``ort_dynamic`` / ``ort_dynamic_per_channel``: ``onnxruntime.quantization.quantize_dynamic``
  on the same fp32 ONNX file (QInt8 weights; per-tensor activations);
- ``torch_dynamic``: ``torch.ao.quantization.quantize_dynamic`` run in PyTorch (its latency is
  compared with fp32 PyTorch, not with ONNX Runtime).

Latency: median of ``repeats`` runs after warm-up, in ``rounds`` interleaved rounds (load on
the machine hits every variant alike); the reported median is the median of the round medians,
ratios are fp32 / variant (also from the fastest round of each, which other load on the
machine disturbs least). Fidelity: mean cosine of each int8 model's embeddings against fp32
PyTorch on the real text of the minilm task's eval batches (queries and documents).

The model is measured with two attention implementations of transformers, the same for every
variant: ``sdpa`` (the default; its ONNX graph masks scores with ``IsNaN``/``Where`` on every
``[batch, heads, tokens, tokens]`` tensor, a fixed float cost that caps every int8 speed-up)
and ``eager`` (the plain softmax attention).

Run ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dynamic_int8.py`` (about 3 minutes on 2
cores); writes ``benchmarks/results/dynamic_int8.json``.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from compactml.examples import minilm
from compactml.export import ort as cort
from compactml.export.onnx import export
from compactml.io import atomic_write_text
from compactml.quantize import Dynamic, quantize
from compactml.task import Task

RESULTS = Path(__file__).resolve().parent / "results" / "dynamic_int8.json"
SEQ = 128
THREADS = 2
BATCHES = (1, 8)
ONNX_VARIANTS = ("fp32", "compactml_dynamic", "ort_dynamic", "ort_dynamic_per_channel")


def random_tokens(batch: int, vocab: int, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """``batch`` x ``seq`` random token ids in the vocabulary, full attention mask."""
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}


def eval_inputs(task: Task) -> list[dict[str, torch.Tensor]]:
    """The tokenized queries and documents of the task's eval batches."""
    return [part for query, doc in task.eval for part in (query, doc)]


def embed_torch(model: nn.Module, inputs: list[dict]) -> np.ndarray:
    """Embeddings of every input batch by a PyTorch model, stacked."""
    with torch.no_grad():
        return np.concatenate([model(**batch).numpy() for batch in inputs])


def embed_onnx(sess: Any, inputs: list[dict]) -> np.ndarray:
    """Embeddings of every input batch by an ONNX Runtime session, stacked."""
    return np.concatenate([cort.run(sess, batch)[0] for batch in inputs])


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows."""
    num = (a * b).sum(axis=1)
    return float((num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


def torch_latency(model: nn.Module, inputs: dict, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of one PyTorch forward (no grad) after ``warmup`` runs."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(**inputs)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def onnx_files(model: nn.Module, folder: Path, example: dict) -> dict[str, Path]:
    """Export fp32 and compactml Dynamic, and run ORT's quantize_dynamic on the fp32 file."""
    paths = {name: folder / f"{name}.onnx" for name in ONNX_VARIANTS}
    export(model, paths["fp32"], example)
    export(quantize(model, Dynamic()), paths["compactml_dynamic"], example)
    for name, per_channel in (("ort_dynamic", False), ("ort_dynamic_per_channel", True)):
        quantize_dynamic(
            paths["fp32"], paths[name], weight_type=QuantType.QInt8, per_channel=per_channel
        )
    return paths


def time_all(
    timers: dict[str, Any], inputs: dict[int, dict], rounds: int
) -> dict[str, dict[str, Any]]:
    """Interleaved rounds of every timer on every batch size: round medians and their median."""
    medians: dict[str, dict[int, list[float]]] = {n: {b: [] for b in inputs} for n in timers}
    for _ in range(rounds):
        for b, batch in inputs.items():
            for name, timer in timers.items():
                medians[name][b].append(timer(batch))
    return {
        name: {
            f"{b}x{SEQ}": {
                "median_ms": statistics.median(v),
                "best_round_ms": min(v),
                "round_medians_ms": v,
            }
            for b, v in per_batch.items()
        }
        for name, per_batch in medians.items()
    }


def add_ratios(latency: dict[str, dict], base: str, names: tuple[str, ...]) -> None:
    """``speedup_vs_<base>`` = base median / variant median for each of ``names`` (and
    ``best_round_speedup_vs_<base>`` from the fastest rounds, less sensitive to other load)."""
    for name in names:
        for size, stats in latency[name].items():
            ref = latency[base][size]
            stats[f"speedup_vs_{base}"] = ref["median_ms"] / stats["median_ms"]
            stats[f"best_round_speedup_vs_{base}"] = ref["best_round_ms"] / stats["best_round_ms"]


def measure(attention: str, repeats: int, rounds: int) -> dict[str, Any]:
    """Latency and fidelity of every variant with one attention implementation."""
    model, task = minilm.load(limit=16, progress=False)
    model.encoder.set_attn_implementation(attention)
    vocab = model.encoder.config.vocab_size
    inputs = {b: random_tokens(b, vocab) for b in BATCHES}
    texts = eval_inputs(task)
    reference = embed_torch(model, texts)
    torch_q = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
    )
    compact = quantize(model, Dynamic())
    with tempfile.TemporaryDirectory() as folder:
        paths = onnx_files(model, Path(folder), inputs[8])
        sessions = {name: cort.session(p, threads=THREADS) for name, p in paths.items()}
        fidelity = {
            name: mean_cosine(embed_onnx(s, texts), reference) for name, s in sessions.items()
        }
        timers = {
            name: (lambda b, s=s: cort.latency(s, b, repeats=repeats, warmup=3)["median_ms"])
            for name, s in sessions.items()
        }
        timers["torch_fp32"] = lambda b: torch_latency(model, b, repeats)
        timers["torch_dynamic"] = lambda b: torch_latency(torch_q, b, repeats)
        latency = time_all(timers, inputs, rounds)
        sizes = {name: p.stat().st_size for name, p in paths.items()}
    add_ratios(latency, "fp32", ONNX_VARIANTS)
    add_ratios(latency, "torch_fp32", ("torch_fp32", "torch_dynamic"))
    fidelity["torch_dynamic"] = mean_cosine(embed_torch(torch_q, texts), reference)
    fidelity["compactml_dynamic_pytorch"] = mean_cosine(embed_torch(compact, texts), reference)
    return {
        "latency": latency,
        "cosine_vs_fp32_pytorch": fidelity,
        "onnx_bytes": sizes,
        "eval_texts": int(sum(len(b["input_ids"]) for b in texts)),
        "session": cort.session_settings(next(iter(sessions.values()))),
    }


def main(repeats: int = 20, rounds: int = 3) -> None:
    """Measure with both attention implementations and write the JSON result."""
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "threads": THREADS,
        },
        "repeats_per_round": repeats,
        "rounds": rounds,
        "minilm": {
            attention: measure(attention, repeats, rounds) for attention in ("sdpa", "eager")
        },
    }
    atomic_write_text(RESULTS, json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
