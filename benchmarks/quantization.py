"""Quantization benchmark of issue 3: size, quality and ONNX Runtime speed of every compactml
scheme next to the peers (ONNX Runtime's ``quantize_static`` / ``quantize_dynamic`` and
torch's ``quantize_dynamic``), all in one process, with the issue's targets checked.

1. digits-cnn: fp32; WeightOnly 8/4/2-bit (per channel and group 16, ``clip="mse"``); Half;
   Static INT8 (percentile, minmax) and post-training Static w4a8/w3a8; QAT w4a8 and w3a8
   (3 epochs); MixedPrecision ``avg_bits=3``: top-1, drop in points, ``.cml`` bytes and ratio
   to fp32; ORT top-1 and latency (batch 1 and 64) of fp32 and Static INT8.
2. minilm (``limit=128``): WeightOnly 8-bit per channel, 4-bit g32 (clip none/mse, symmetric
   and asymmetric), Half, Dynamic (per token, and ``per_tensor="auto"``), and torch's
   ``quantize_dynamic``: cosine fidelity against fp32, retrieval MRR, ``.cml`` ratio
   (embedding table included). In ONNX Runtime, with both
   attention implementations (``sdpa``, the default, and ``eager``): fp32, 4-bit g32 mse as
   MatMulNBits (accuracy level 0 and 4), compactml Dynamic (both), and ORT ``quantize_dynamic``
   (per tensor, per channel): latency at 1x128 and 8x128 tokens, and (``sdpa`` files)
   fidelity and MRR scored through ORT. torch ``quantize_dynamic`` is timed against fp32
   PyTorch.
3. ResNet-18 shape at 224x224 (``benchmarks/static_int8.py:resnet``): fp32, compactml Static,
   ORT ``quantize_static`` QDQ and QOperator: latency at batch 1 and 8, top-1 agreement.

Latency is always a ratio to fp32 measured in the same process, with interleaved rounds
(``benchmarks/common.py``); 2 intra-op threads. Run ``HF_HUB_OFFLINE=1 .venv/bin/python
benchmarks/quantization.py`` (about 8 minutes on 2 cores); writes
``benchmarks/results/quantization.json`` and prints the targets.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from common import (
    THREADS,
    OrtModule,
    add_speedups,
    interleaved,
    machine_info,
    ort_timer,
    recorded_warnings,
    torch_timer,
    write_results,
)
from dynamic_int8 import ort_quantize_dynamic, quality, torch_dynamic
from onnx_weight_only import SEQ, token_batch
from static_int8 import ort_top1, resnet
from torch import nn

from compactml.config import Technique, history
from compactml.evaluate import evaluate
from compactml.examples import digits_cnn, minilm
from compactml.export import ort as cort
from compactml.export.artifact import artifact_bytes
from compactml.export.onnx import export
from compactml.quantize import (
    QAT,
    Dynamic,
    Half,
    MixedPrecision,
    Static,
    WeightOnly,
    quantize,
)
from compactml.task import Task

ROUNDS = 5
REPEATS = 10


def digits_configs() -> dict[str, Technique]:
    """The digits-cnn variants, by result name."""
    configs: dict[str, Technique] = {}
    for bits in (8, 4, 2):
        for group, label in ((None, "per_channel"), (16, "g16")):
            configs[f"weight_only_{bits}bit_{label}_mse"] = WeightOnly(
                bits=bits, group_size=group, clip="mse"
            )
    configs["half_float16"] = Half()
    for observer in ("percentile", "minmax"):
        configs[f"static_int8_{observer}"] = Static(observer=observer, progress=False)
    for bits in (4, 3):
        configs[f"ptq_static_w{bits}a8"] = Static(bits=bits, observer="percentile", progress=False)
        configs[f"qat_w{bits}a8"] = QAT(weight_bits=bits, act_bits=8, epochs=3, progress=False)
    configs["mixed_avg3"] = MixedPrecision(avg_bits=3, group_size=None, progress=False)
    return configs


def apply(config: Technique, model: nn.Module, task: Task | None) -> tuple[nn.Module, dict]:
    """``quantize(model, config, task)`` timed, with its config and warnings for the report."""
    start = time.perf_counter()
    q, warns = recorded_warnings(lambda: quantize(model, config, task))
    info = {"config": repr(config), "apply_s": time.perf_counter() - start}
    if warns:
        info["warnings"] = warns
    return q, info


def digits(tmp: Path, rounds: int, repeats: int) -> dict[str, Any]:
    """digits-cnn: quality and size of every variant; ORT top-1 and latency of Static INT8."""
    model, task = digits_cnn.load(progress=False)
    fp32_top1 = evaluate(model, task, noise_levels=())["top1"]
    fp32_bytes = len(artifact_bytes(model))
    variants: dict[str, dict] = {"fp32": {"top1": fp32_top1, "artifact_bytes": fp32_bytes}}
    onnx_paths = {"fp32": export(model, tmp / "digits_fp32.onnx", task.example_input())}
    for name, config in digits_configs().items():
        q, info = apply(config, model, task)
        top1 = evaluate(q, task, noise_levels=())["top1"]
        size = len(artifact_bytes(q))
        drop = 100 * (fp32_top1 - top1)
        variants[name] = {"top1": top1, "drop_points": drop, "artifact_bytes": size,
                          "artifact_ratio": size / fp32_bytes, **info}  # fmt: skip
        if isinstance(config, MixedPrecision):
            variants[name]["plan"] = history(q)[-1]["plan"]
        if name.startswith("static_int8"):
            onnx_paths[name] = export(q, tmp / f"digits_{name}.onnx", task.example_input())
    for name, path in onnx_paths.items():
        variants[name]["ort_top1"] = ort_top1(path, task)
    x = torch.cat([images for images, _ in task.batches("eval")])[:64]
    sessions = {name: cort.session(p, THREADS) for name, p in onnx_paths.items()}
    latency = {}
    for b in (1, 64):
        latency[f"batch{b}"] = interleaved(
            {n: ort_timer(s, x[:b], repeats * 10) for n, s in sessions.items()}, rounds
        )
        add_speedups(latency[f"batch{b}"], "fp32")
    return {"variants": variants, "ort_latency": latency}


def minilm_configs() -> dict[str, Technique]:
    """The minilm variants quantized by compactml, by result name."""
    configs: dict[str, Technique] = {
        "weight_only_8bit_per_channel": WeightOnly(bits=8, group_size=None)
    }
    for clip in ("none", "mse"):
        for symmetric, label in ((True, "sym"), (False, "asym")):
            configs[f"weight_only_4bit_g32_{clip}_{label}"] = WeightOnly(
                bits=4, group_size=32, symmetric=symmetric, clip=clip
            )
    configs["half_float16"] = Half()
    configs["dynamic_int8"] = Dynamic()
    configs["dynamic_int8_auto"] = Dynamic(per_tensor="auto", progress=False)
    return configs


def minilm_onnx(
    models: dict[str, nn.Module], attention: str, folder: Path, example: dict
) -> dict[str, Path]:
    """Export fp32, 4-bit g32 mse (MatMulNBits, accuracy level 0 and 4) and compactml Dynamic
    with ``attention``, and run ORT's ``quantize_dynamic`` on the fp32 file."""
    for m in models.values():
        m.encoder.set_attn_implementation(attention)
    int4 = models["weight_only_4bit_g32_mse_sym"]
    paths = {
        "fp32": export(models["fp32"], folder / f"{attention}_fp32.onnx", example),
        "compactml_int4_g32_mse": export(int4, folder / f"{attention}_int4.onnx", example),
        "compactml_int4_g32_mse_acc4": export(
            int4, folder / f"{attention}_int4_acc4.onnx", example, accuracy_level=4
        ),
        "compactml_dynamic": export(
            models["dynamic_int8"], folder / f"{attention}_dynamic.onnx", example
        ),
        "compactml_dynamic_auto": export(
            models["dynamic_int8_auto"], folder / f"{attention}_dynamic_auto.onnx", example
        ),
    }
    paths.update(ort_quantize_dynamic(paths["fp32"], folder))
    return paths


def minilm_speed(
    models: dict[str, nn.Module], task: Task, folder: Path, rounds: int, repeats: int
) -> dict[str, Any]:
    """ORT latency (both attention implementations; ``repeats`` runs per round at 8x128, three
    times that at 1x128), ORT-scored quality (sdpa) and file sizes; torch quantize_dynamic
    timed against fp32 PyTorch."""
    inputs = {f"{b}x{SEQ}": token_batch(b) for b in (1, 8)}
    out: dict[str, Any] = {"ort_quality": {}, "onnx_bytes": {}, "latency": {}}
    for attention in ("sdpa", "eager"):
        paths = minilm_onnx(models, attention, folder, inputs[f"8x{SEQ}"])
        sessions = {name: cort.session(p, THREADS) for name, p in paths.items()}
        if attention == "sdpa":
            out["ort_quality"] = {n: quality(OrtModule(s), task) for n, s in sessions.items()}
            out["onnx_bytes"] = {n: p.stat().st_size for n, p in paths.items()}
        out["latency"][attention] = {}
        for size, x in inputs.items():
            n_runs = repeats * 3 if size.startswith("1x") else repeats
            timers = {n: ort_timer(s, x, n_runs) for n, s in sessions.items()}
            timers["torch_fp32"] = torch_timer(models["fp32"], x, n_runs)
            timers["torch_dynamic"] = torch_timer(models["torch_dynamic"], x, n_runs)
            latency = interleaved(timers, rounds)
            add_speedups(latency, "fp32", list(paths))
            add_speedups(latency, "torch_fp32", ["torch_fp32", "torch_dynamic"])
            out["latency"][attention][size] = latency
        del sessions
    for m in models.values():
        m.encoder.set_attn_implementation("sdpa")
    return out


def minilm_section(tmp: Path, rounds: int, repeats: int) -> dict[str, Any]:
    """minilm: PyTorch quality and ``.cml`` size of every variant, then ORT speed."""
    model, task = minilm.load(limit=128, progress=False)
    fp32_bytes = len(artifact_bytes(model))
    variants: dict[str, dict] = {"fp32": {**quality(model, task), "artifact_bytes": fp32_bytes}}
    models: dict[str, nn.Module] = {"fp32": model}
    for name, config in minilm_configs().items():
        models[name], info = apply(config, model, task)
        size = len(artifact_bytes(models[name]))
        variants[name] = {**quality(models[name], task), "artifact_bytes": size,
                          "artifact_ratio": size / fp32_bytes, **info}  # fmt: skip
    models["torch_dynamic"] = torch_dynamic(model)
    variants["torch_dynamic"] = {
        **quality(models["torch_dynamic"], task),
        "config": "torch.ao.quantization.quantize_dynamic(qint8 Linear)",
    }
    speed = minilm_speed(
        {k: models[k] for k in ("fp32", "weight_only_4bit_g32_mse_sym", "dynamic_int8",
                                "dynamic_int8_auto", "torch_dynamic")},
        task, tmp, rounds, repeats)  # fmt: skip
    return {"eval_queries": variants["fp32"].get("queries", 128), "variants": variants, **speed}


def check(
    name: str, value: float, op: str, threshold: float, best_round: float | None = None
) -> dict[str, Any]:
    """One target: ``value op threshold`` with ``op`` one of <=, >=, <, >. Speed targets also
    carry the value from the fastest rounds (``best_round``), for reference only."""
    ok = {"<=": value <= threshold, ">=": value >= threshold,
          "<": value < threshold, ">": value > threshold}[op]  # fmt: skip
    row = {"target": name, "value": value, "op": op, "threshold": threshold, "pass": bool(ok)}
    if best_round is not None:
        row["best_round_value"] = best_round
    return row


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and pass/fail."""
    d = results["digits_cnn"]["variants"]
    m = results["minilm"]["variants"]
    ort_q = results["minilm"]["ort_quality"]
    r = results["resnet18_224"]["latency"]
    peers = ("ort_dynamic", "ort_dynamic_per_channel")
    rows = []
    for obs in ("percentile", "minmax"):
        v = d[f"static_int8_{obs}"]
        rows.append((f"digits static int8 ({obs}) drop points", v["drop_points"], "<=", 0.5))
        rows.append((f"digits static int8 ({obs}) artifact ratio", v["artifact_ratio"], "<=", 0.27))
    for bits in (4, 3):
        drop = d[f"qat_w{bits}a8"]["drop_points"]
        rows.append((f"digits QAT w{bits}a8 drop points", drop, "<=", 0.5))
        ptq = d[f"ptq_static_w{bits}a8"]["drop_points"]
        rows.append((f"digits PTQ static w{bits}a8 drop points (must exceed)", ptq, ">", 0.5))
    rows.append(("minilm 8-bit weight-only cosine",
                 m["weight_only_8bit_per_channel"]["cosine_fidelity"], ">=", 0.999))  # fmt: skip
    for label in ("sym", "asym"):  # the CLI's int4-weight scheme is the asymmetric one
        int4 = m[f"weight_only_4bit_g32_mse_{label}"]
        rows.append((f"minilm 4-bit g32 mse {label} cosine", int4["cosine_fidelity"], ">=", 0.98))
        rows.append((f"minilm 4-bit g32 mse {label} artifact ratio",
                     int4["artifact_ratio"], "<=", 0.17))  # fmt: skip
    for ours, label in (("compactml_dynamic", "Dynamic"),
                        ("compactml_dynamic_auto", "Dynamic(per_tensor='auto')")):  # fmt: skip
        rows.append((f"minilm {label} ORT cosine > best ORT quantize_dynamic peer",
                     ort_q[ours]["cosine_fidelity"], ">",
                     max(ort_q[p]["cosine_fidelity"] for p in peers)))  # fmt: skip
        for attention, lat in results["minilm"]["latency"].items():
            v = lat[f"8x{SEQ}"][ours]
            best = v["best_round_speedup_vs_fp32"]
            rows.append((f"minilm {label} speed-up vs fp32 at 8x{SEQ} ({attention})",
                         v["speedup_vs_fp32"], ">=", 2.5, best))  # fmt: skip
    v = r["batch1"]["compactml_static"]
    rows.append(("resnet18 static speed-up vs fp32 at batch 1", v["speedup_vs_fp32"], ">=", 3.0,
                 v["best_round_speedup_vs_fp32"]))  # fmt: skip
    for batch, lat in r.items():
        ours = lat["compactml_static"]
        for peer in ("ort_static_qdq", "ort_static_qoperator"):
            ratio = lat[peer]["median_ms"] / ours["median_ms"]
            best = lat[peer]["best_round_ms"] / ours["best_round_ms"]
            rows.append((f"resnet18 {batch}: {peer} ms / compactml ms", ratio, ">=", 1.0, best))
    return [check(*row) for row in rows]


def main(rounds: int = ROUNDS, repeats: int = REPEATS) -> None:
    """Run every section, check the targets, write the JSON and print the targets."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore", module="torch.onnx")  # exporter notes on HF attention
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    logging.getLogger().setLevel(logging.ERROR)  # ORT quantization's pre-processing advice
    ort.set_default_logger_severity(3)  # ORT's note on saving the optimized graph
    start = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "rounds": rounds, "repeats": repeats}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        results["digits_cnn"] = digits(tmp, rounds, repeats)
        results["minilm"] = minilm_section(tmp, rounds, repeats)
        results["resnet18_224"] = resnet(tmp, rounds, repeats)
    results["targets"] = targets(results)
    results["total_s"] = time.perf_counter() - start
    path = write_results("quantization", results)
    for t in results["targets"]:
        flag = "PASS" if t["pass"] else "FAIL"
        best = f" (best rounds {t['best_round_value']:.4f})" if "best_round_value" in t else ""
        print(f"{flag}  {t['target']}: {t['value']:.4f} {t['op']} {t['threshold']:.4f}{best}")
    print(f"{results['total_s']:.0f} s; written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
