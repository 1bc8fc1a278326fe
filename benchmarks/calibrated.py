"""Calibration-based compression benchmark (issue 5): GPTQ, AWQ, SmoothQuant, SparseGPT and
Wanda against their data-free baselines on minilm and tiny-llama, all in one process.

For each model (minilm: cosine fidelity to the fp32 model and retrieval MRR on the docstring
task; tiny-llama: perplexity on held-out stdlib modules), every nn.Linear layer is compressed,
tiny-llama's LM head included (a fifth of its weights; the papers often keep it in 16 bits),
embeddings and norms stay float, with the task's 128 calibration sequences:

1. weight-only 4 and 3 bits at group 64 and 128: round-to-nearest (``WeightOnly``), ``GPTQ``
   (and GPTQ with ``act_order`` at group 64), ``AWQ``;
2. 50% unstructured and 2:4 sparsity: magnitude (``Magnitude`` per layer / ``NM``), ``Wanda``,
   ``SparseGPT``; for tiny-llama also 50% with the LM head left dense (``sparse_blocks``: the
   decoder blocks only, as both papers prune);
3. W8A8: plain ``Static`` INT8 against ``SmoothQuant`` (alpha 0.5) then static INT8, each with
   the minmax and the percentile activation observer.

Each row keeps the quality, its loss against fp32 (``error`` = 1 - cosine fidelity for minilm,
perplexity increase for tiny-llama), and the wall and CPU seconds of the compression call. The
issue's targets are checked at the end (PASS/FAIL).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/calibrated.py [minilm] [llama]`` ->
``benchmarks/results/calibrated.json``; naming a model reruns only that one (the other's rows
are kept from the previous file). About 15 minutes on 2 idle cores; tiny-llama is trained and
cached on first use (about 6 minutes more).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from common import RESULTS_DIR, machine_info, write_results
from torch import nn

import compactml as cml
from compactml.config import Technique
from compactml.examples import minilm, tiny_llama
from compactml.task import Task

OUT = RESULTS_DIR / "calibrated.json"
BITS, GROUPS = (4, 3), (64, 128)
OBSERVERS = ("minmax", "percentile")


def linears(model: nn.Module) -> tuple[str, ...]:
    """Names of every nn.Linear layer of the model (the LM head included)."""
    return tuple(n for n, m in model.named_modules() if type(m) is nn.Linear)


def configs(layers: tuple[str, ...]) -> dict[str, dict[str, Technique]]:
    """Every variant, by section, restricted to ``layers``."""
    only = {"include": layers}
    weight_only: dict[str, Technique] = {}
    for bits in BITS:
        for group in GROUPS:
            key = f"w{bits}_g{group}"
            weight_only[f"{key}_rtn"] = cml.WeightOnly(bits=bits, group_size=group, **only)
            weight_only[f"{key}_gptq"] = cml.GPTQ(
                bits=bits, group_size=group, progress=False, **only
            )
            if group == GROUPS[0]:
                weight_only[f"{key}_gptq_act_order"] = cml.GPTQ(
                    bits=bits, group_size=group, act_order=True, progress=False, **only
                )
            if hasattr(cml, "AWQ"):
                weight_only[f"{key}_awq"] = cml.AWQ(
                    bits=bits, group_size=group, progress=False, **only
                )
    sparse: dict[str, Technique] = {
        "50%_magnitude": cml.Magnitude(sparsity=0.5, **only),
        "2:4_magnitude": cml.NM(n=2, m=4, **only),
    }
    if hasattr(cml, "Wanda"):
        sparse["50%_wanda"] = cml.Wanda(sparsity=0.5, progress=False, **only)
        sparse["2:4_wanda"] = cml.Wanda(n=2, m=4, progress=False, **only)
    if hasattr(cml, "SparseGPT"):
        sparse["50%_sparsegpt"] = cml.SparseGPT(sparsity=0.5, progress=False, **only)
        sparse["2:4_sparsegpt"] = cml.SparseGPT(n=2, m=4, progress=False, **only)
    w8a8: dict[str, Technique] = {}
    for observer in OBSERVERS:
        w8a8[f"static_{observer}"] = cml.Static(observer=observer, progress=False, **only)
        w8a8[f"smoothquant_0.5_{observer}"] = cml.SmoothQuant(
            alpha=0.5, observer=observer, progress=False, **only
        )
    return {"weight_only": weight_only, "sparse": sparse, "w8a8": w8a8}


def timed(fn: Callable[[], nn.Module]) -> tuple[nn.Module, float, float]:
    """``fn()``, its wall seconds and its CPU seconds (all threads of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def minilm_quality(model: nn.Module, task: Task) -> dict[str, float]:
    m = cml.evaluate(model, task, reference=task.reference)
    fidelity = float(m["cosine_fidelity"])
    return {"cosine_fidelity": fidelity, "mrr": float(m["mrr"]), "error": 1.0 - fidelity}


def run_model(
    name: str, model: nn.Module, task: Task, quality: Callable[[nn.Module], dict[str, float]]
) -> dict[str, Any]:
    """Every variant of :func:`configs` on ``model``; the rows, by section."""
    base = quality(model)
    layers = linears(model)
    print(f"{name}: fp32 {base}; {len(layers)} Linear layers", flush=True)
    rows: dict[str, Any] = {"fp32": base, "layers": len(layers)}
    for section, variants in configs(layers).items():
        rows[section] = {}
        for key, config in variants.items():
            rows[section][key] = measure(model, task, config, quality, f"{section} {key}")
    return rows


def measure(
    model: nn.Module, task: Task, config: Technique,
    quality: Callable[[nn.Module], dict[str, float]], label: str,
) -> dict[str, Any]:  # fmt: skip
    """One variant: its quality, wall and CPU seconds, and sparsity for pruning; printed."""
    apply = cml.prune if config.family == "prune" else cml.quantize
    out, wall, cpu = timed(lambda: apply(model, config, task))
    row = {**quality(out), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    if config.family == "prune":
        row["sparsity"] = cml.sparsity(out).total
    print(f"  {label}: {row}", flush=True)
    return row


def minilm_rows() -> dict[str, Any]:
    model, task = minilm.load(limit=128, progress=False)
    return run_model("minilm", model, task, lambda m: minilm_quality(m, task))


def llama_rows() -> dict[str, Any]:
    model, task = tiny_llama.load(progress=False)

    def quality(m: nn.Module) -> dict[str, float]:
        return {"perplexity": float(cml.evaluate(m, task)["perplexity"])}

    rows = run_model("tiny-llama", model, task, quality)
    rows["sparse_blocks"] = blocks_only_sparse(model, task, quality)
    base = rows["fp32"]["perplexity"]
    for section in ("weight_only", "sparse", "sparse_blocks", "w8a8"):
        for row in rows[section].values():
            row["error"] = row["perplexity"] - base
    return rows


def blocks_only_sparse(
    model: nn.Module, task: Task, quality: Callable[[nn.Module], dict[str, float]]
) -> dict[str, Any]:
    """50% unstructured sparsity of the decoder blocks' Linear layers only, the LM head left
    dense, as the Wanda and SparseGPT papers prune: magnitude, Wanda and SparseGPT."""
    blocks = {"include": tuple(n for n in linears(model) if "lm_head" not in n)}
    variants: dict[str, Technique] = {
        "50%_magnitude": cml.Magnitude(sparsity=0.5, **blocks),
        "50%_wanda": cml.Wanda(sparsity=0.5, progress=False, **blocks),
        "50%_sparsegpt": cml.SparseGPT(sparsity=0.5, progress=False, **blocks),
    }
    return {
        key: measure(model, task, config, quality, f"sparse_blocks {key}")
        for key, config in variants.items()
    }


def ratio(rows: dict[str, Any], section: str, variant: str, baseline: str) -> float | None:
    """``error(variant) / error(baseline)`` in one section, None when either is missing."""
    got, base = rows.get(section, {}).get(variant), rows.get(section, {}).get(baseline)
    if got is None or base is None or base["error"] <= 0:
        return None
    return got["error"] / base["error"]


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured figure and PASS/FAIL."""
    checks: dict[str, Any] = {}

    def check(label: str, value: float | None, limit: float) -> None:
        if value is None:
            checks[label] = {"value": None, "limit": limit, "status": "MISSING"}
            return
        ok = value <= limit
        checks[label] = {
            "value": round(value, 4),
            "limit": limit,
            "status": "PASS" if ok else "FAIL",
        }

    lm, llama = results.get("minilm", {}), results.get("tiny-llama", {})
    check(
        "minilm GPTQ 4-bit g64 error / RTN",
        ratio(lm, "weight_only", "w4_g64_gptq", "w4_g64_rtn"),
        0.7,
    )
    check(
        "minilm GPTQ 3-bit g64 error / RTN",
        ratio(lm, "weight_only", "w3_g64_gptq", "w3_g64_rtn"),
        0.5,
    )
    for bits in BITS:
        check(
            f"tiny-llama GPTQ {bits}-bit g64 ppl increase / RTN",
            ratio(llama, "weight_only", f"w{bits}_g64_gptq", f"w{bits}_g64_rtn"),
            0.6,
        )
    for model_name, rows in (("minilm", lm), ("tiny-llama", llama)):
        for bits in BITS:
            for group in GROUPS:
                key = f"w{bits}_g{group}"
                check(
                    f"{model_name} AWQ {bits}-bit g{group} error / RTN (beats RTN: < 1)",
                    ratio(rows, "weight_only", f"{key}_awq", f"{key}_rtn"),
                    0.9999,
                )
        for method in ("wanda", "sparsegpt"):
            check(
                f"{model_name} {method} 50% error / magnitude",
                ratio(rows, "sparse", f"50%_{method}", "50%_magnitude"),
                0.5,
            )
    for method in ("wanda", "sparsegpt"):
        check(
            f"tiny-llama {method} 50% error / magnitude, LM head dense (papers' protocol)",
            ratio(llama, "sparse_blocks", f"50%_{method}", "50%_magnitude"),
            0.5,
        )
    gptq = lm.get("weight_only", {}).get("w4_g64_gptq")
    check("minilm GPTQ 4-bit g64 wall seconds", None if gptq is None else gptq["wall_s"], 60.0)
    return checks


def main(argv: list[str]) -> None:
    torch.manual_seed(0)
    wanted = set(argv) or {"minilm", "llama"}
    unknown = wanted - {"minilm", "llama"}
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; use minilm and/or llama")
    results: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() and argv else {}
    results["machine"] = machine_info()
    if "minilm" in wanted:
        results["minilm"] = minilm_rows()
    if "llama" in wanted:
        results["tiny-llama"] = llama_rows()
    results["targets"] = targets(results)
    for label, found in results["targets"].items():
        print(f"{found['status']:7} {label}: {found['value']} (limit {found['limit']})")
    write_results(OUT.stem, results)


if __name__ == "__main__":
    main(sys.argv[1:])
