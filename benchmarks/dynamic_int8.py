"""MiniLM dynamic INT8 in ONNX Runtime: compactml ``Dynamic`` against fp32 and the peers.

All in one process, 2 intra-op threads, CPU execution provider, ORT_ENABLE_ALL. Every ONNX file
is exported by ``compactml.export.onnx.export`` with a dict input (docstring text filling 128
tokens). Variants:

- ``fp32``: the float model; ``compactml_dynamic``: ``Dynamic(bits=8)`` (per-token uint8
  activations, int8 per-channel weights; :mod:`compactml.export.onnx_dynamic`);
  ``compactml_dynamic_mixed``: the same with ``per_tensor=MIXED`` (q, k, v and the attention
  output projection quantize their input per tensor, which ONNX Runtime fuses with the matmul
  and bias into ``DynamicQuantizeMatMul``; the FFN layers stay per token);
  ``compactml_dynamic_auto``: ``Dynamic(per_tensor="auto")``, the per-tensor layers chosen on
  the task's calibration batches (:mod:`compactml.quantize.dynamic_choice`; the choice is
  written to the JSON as ``auto_choice``);
- ``ort_dynamic`` / ``ort_dynamic_per_channel``: ``onnxruntime.quantization.quantize_dynamic``
  on the same fp32 ONNX file (QInt8 weights, per tensor / per channel);
- ``torch_dynamic``: ``torch.ao.quantization.quantize_dynamic`` run in PyTorch (its latency is
  compared with fp32 PyTorch, not with ONNX Runtime).

Latency: interleaved rounds (see ``benchmarks/common.py``). Fidelity: ``compactml.evaluate``
(cosine fidelity against fp32 PyTorch, retrieval MRR) on the minilm task's eval pairs, with the
ONNX files scored through ONNX Runtime.

The model is measured with two attention implementations of transformers, the same for every
variant: ``sdpa`` (the default; its ONNX graph masks scores with ``IsNaN``/``Where`` on every
``[batch, heads, tokens, tokens]`` tensor, a fixed float cost that caps every int8 speed-up)
and ``eager`` (the plain softmax attention).

:func:`ort_quantize_dynamic` and :func:`torch_dynamic` are also used by
``benchmarks/quantization.py``. Run ``HF_HUB_OFFLINE=1 .venv/bin/python
benchmarks/dynamic_int8.py`` (about 3 minutes on 2 cores); writes
``benchmarks/results/dynamic_int8.json``.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from common import (
    THREADS,
    OrtModule,
    add_speedups,
    interleaved,
    machine_info,
    ort_timer,
    torch_timer,
    write_results,
)
from onnx_weight_only import SEQ, token_batch
from torch import nn

from compactml.config import history
from compactml.evaluate import evaluate
from compactml.examples import minilm
from compactml.export import ort as cort
from compactml.export.onnx import export
from compactml.quantize import Dynamic, quantize
from compactml.task import Task

#: ORT's quantize_dynamic variants: name -> per_channel.
ORT_DYNAMIC = {"ort_dynamic": False, "ort_dynamic_per_channel": True}
#: Layers of the "mixed" variant quantized per tensor (all-MiniLM-L6-v2 module names).
MIXED = ("*attention.self.*", "*attention.output.dense")


def ort_quantize_dynamic(fp32: Path, folder: Path) -> dict[str, Path]:
    """The peers: ``onnxruntime.quantization.quantize_dynamic`` of ``fp32`` with QInt8 weights,
    per tensor and per channel; returns name -> path."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    paths = {}
    for name, per_channel in ORT_DYNAMIC.items():
        paths[name] = folder / f"{fp32.stem}_{name}.onnx"
        quantize_dynamic(fp32, paths[name], weight_type=QuantType.QInt8, per_channel=per_channel)
    return paths


def torch_dynamic(model: nn.Module) -> nn.Module:
    """The peer in PyTorch: ``torch.ao.quantization.quantize_dynamic`` (qint8 Linear) of a copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )


def quality(model: nn.Module, task: Task) -> dict[str, float]:
    """Cosine fidelity (mean, min) against ``task.reference`` and retrieval MRR."""
    m = evaluate(model, task, reference=task.reference)
    return {k: m[k] for k in ("cosine_fidelity", "cosine_fidelity_min", "mrr")}


def measure(attention: str, repeats: int, rounds: int) -> dict[str, Any]:
    """Latency and fidelity of every variant with one attention implementation."""
    model, task = minilm.load(limit=128, progress=False)
    model.encoder.set_attn_implementation(attention)
    inputs = {f"{b}x{SEQ}": token_batch(b) for b in (1, 8)}
    torch_q = torch_dynamic(model)
    with tempfile.TemporaryDirectory() as folder:
        paths = {"fp32": export(model, Path(folder) / "fp32.onnx", inputs[f"8x{SEQ}"])}
        paths["compactml_dynamic_mixed"] = export(
            quantize(model, Dynamic(per_tensor=MIXED)), Path(folder) / "mixed.onnx",
            inputs[f"8x{SEQ}"],
        )  # fmt: skip
        auto = quantize(model, Dynamic(per_tensor="auto", progress=False), task)
        paths["compactml_dynamic_auto"] = export(
            auto, Path(folder) / "auto.onnx", inputs[f"8x{SEQ}"]
        )
        chosen = history(auto)[-1]
        paths["compactml_dynamic"] = export(
            quantize(model, Dynamic()), Path(folder) / "dynamic.onnx", inputs[f"8x{SEQ}"]
        )
        paths.update(ort_quantize_dynamic(paths["fp32"], Path(folder)))
        sessions = {name: cort.session(p, THREADS) for name, p in paths.items()}
        fidelity = {name: quality(OrtModule(s), task) for name, s in sessions.items()}
        latency = {}
        for size, x in inputs.items():
            timers = {n: ort_timer(s, x, repeats) for n, s in sessions.items()}
            timers["torch_fp32"] = torch_timer(model, x, repeats)
            timers["torch_dynamic"] = torch_timer(torch_q, x, repeats)
            latency[size] = interleaved(timers, rounds)
            add_speedups(latency[size], "fp32", list(paths))
            add_speedups(latency[size], "torch_fp32", ["torch_fp32", "torch_dynamic"])
        sizes = {name: p.stat().st_size for name, p in paths.items()}
    fidelity["torch_dynamic"] = quality(torch_q, task)
    auto_choice = {"per_tensor": chosen["per_tensor"], **chosen["selection"]}
    return {
        "latency": latency,
        "quality": fidelity,
        "onnx_bytes": sizes,
        "auto_choice": auto_choice,
    }


def main(repeats: int = 10, rounds: int = 3) -> None:
    """Measure with both attention implementations and write the JSON result."""
    torch.set_num_threads(THREADS)
    results = {
        "machine": machine_info(),
        "repeats_per_round": repeats,
        "rounds": rounds,
        "minilm": {
            attention: measure(attention, repeats, rounds) for attention in ("sdpa", "eager")
        },
    }
    print(f"written to {write_results('dynamic_int8', results)}")


if __name__ == "__main__":
    main()
