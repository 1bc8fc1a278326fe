"""Static INT8: quality on digits-cnn and ONNX Runtime speed on a ResNet-18-shaped network.

1. digits-cnn (fp32 top-1 0.9889): ``Static`` with each observer; top-1 of the PyTorch model
   and of its ONNX export in ONNX Runtime, the drop against fp32, and the ``.cml`` artifact size
   against the fp32 artifact.
2. ResNet-18 shape (random weights, randomized BatchNorm statistics, 224x224, 1000 classes),
   calibrated on 8 random normal images: ORT latency (2 threads, batch 1 and 8) of the fp32
   ONNX file, of compactml ``Static`` (minmax) exported, and of
   ``onnxruntime.quantization.quantize_static`` on the same fp32 file with the same calibration
   data (QDQ and QOperator formats, uint8 activations, int8 per-channel weights, minmax); which
   ops ORT's optimized graph runs; logits agreement with the PyTorch models.

Sessions are timed in interleaved rounds so machine load hits all alike; medians and 10th
percentiles are both reported (the latter is less sensitive to other processes). Run
``.venv/bin/python benchmarks/static_int8.py`` (a few minutes on 2 cores); writes
``benchmarks/results/static_int8.json``.
"""

from __future__ import annotations

import collections
import json
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from compactml.evaluate import evaluate
from compactml.examples import digits_cnn
from compactml.examples.resnet import resnet18
from compactml.export import ort as cort
from compactml.export.artifact import save
from compactml.export.onnx import export
from compactml.io import atomic_write_text
from compactml.quantize.ptq import Static
from compactml.task import Task

RESULTS = Path(__file__).resolve().parent / "results" / "static_int8.json"
OBSERVERS = ("minmax", "percentile", "mse", "entropy")


def ort_top1(path: Path, task: Task) -> float:
    """Top-1 accuracy of the ONNX file at ``path`` on ``task.eval``."""
    sess, right, total = cort.session(path), 0, 0
    for x, y in task.batches("eval"):
        pred = cort.run(sess, x)[0].argmax(1)
        right += int((pred == y.numpy()).sum())
        total += len(y)
    return right / total


def digits(tmp: Path) -> dict:
    """digits-cnn fp32 vs Static with each observer: top-1 (PyTorch and ORT) and sizes."""
    model, task = digits_cnn.load(progress=False)
    fp32_top1 = evaluate(model, task, noise_levels=())["top1"]
    fp32_bytes = save(model, tmp / "fp32.cml").stat().st_size
    out = {"fp32": {"top1": fp32_top1, "artifact_bytes": fp32_bytes}}
    for name in OBSERVERS:
        q = Static(observer=name, progress=False).apply(model, task)
        top1 = evaluate(q, task, noise_levels=())["top1"]
        size = save(q, tmp / f"{name}.cml").stat().st_size
        onnx_path = export(q, tmp / f"{name}.onnx", task.example_input())
        out[name] = {
            "top1": top1,
            "drop_points": 100 * (fp32_top1 - top1),
            "ort_top1": ort_top1(onnx_path, task),
            "artifact_bytes": size,
            "artifact_ratio": size / fp32_bytes,
        }
    return out


def optimized_ops(path: Path, tmp: Path) -> dict[str, int]:
    """Op counts of ORT's optimized graph of ``path`` (ORT_ENABLE_ALL)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp / (path.stem + ".opt.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return dict(collections.Counter(n.op_type for n in graph.node))


def peer(fp32: Path, calib: list[torch.Tensor], tmp: Path, fmt: str) -> Path:
    """``quantize_static`` of ``fp32`` (after ORT's pre-processing) in format ``fmt``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": x.numpy()} for x in calib])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    pre = tmp / "resnet_pre.onnx"
    if not pre.exists():
        quant_pre_process(str(fp32), str(pre))
    out = tmp / f"resnet_peer_{fmt.lower()}.onnx"
    quantize_static(
        str(pre), str(out), Reader(), quant_format=getattr(QuantFormat, fmt),
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
    )  # fmt: skip
    return out


def timed(paths: dict[str, Path], x: torch.Tensor, rounds: int, repeats: int) -> dict:
    """Per file: the median over interleaved rounds of each round's median and 10th percentile
    latency (ms). The 10th percentile is less sensitive to other load on the machine."""
    sessions = {name: cort.session(p, 2) for name, p in paths.items()}
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, sess in sessions.items():
            runs[name].append(cort.latency(sess, x, repeats=repeats, warmup=3))
    return {
        name: {key: statistics.median(r[key] for r in rs) for key in ("median_ms", "p10_ms")}
        for name, rs in runs.items()
    }


def resnet(tmp: Path, rounds: int = 5, repeats: int = 20) -> dict:
    """ResNet-18 at 224x224: latency of fp32, compactml Static and the ORT peer."""
    model = resnet18()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(8)]
    q = Static(progress=False).apply(model, Task(calib=[(x,) for x in calib]))
    test = torch.randn(8, 3, 224, 224, generator=g)
    paths = {
        "fp32": export(model, tmp / "resnet_fp32.onnx", calib[0]),
        "compactml_static": export(q, tmp / "resnet_static.onnx", calib[0]),
    }
    paths["ort_qdq"] = peer(paths["fp32"], calib, tmp, "QDQ")
    paths["ort_qoperator"] = peer(paths["fp32"], calib, tmp, "QOperator")
    with torch.no_grad():
        ref_fp32, ref_q = model(test).numpy(), q(test).numpy()
    quality = {}
    for name, path in paths.items():
        logits = cort.run(cort.session(path), test)[0]
        quality[name] = {
            "top1_agreement_vs_fp32": float((logits.argmax(1) == ref_fp32.argmax(1)).mean()),
            "max_abs_vs_fp32": float(np.abs(logits - ref_fp32).max()),
            "max_abs_vs_pytorch_static": float(np.abs(logits - ref_q).max()),
        }
    latency = {f"batch{b}": timed(paths, test[:b], rounds, repeats) for b in (1, 8)}
    return {
        "latency_ms": latency,
        "speedup_vs_fp32": {
            k: {n: {q: v["fp32"][q] / t[q] for q in t} for n, t in v.items()}
            for k, v in latency.items()
        },
        "quality": quality,
        "logit_scale": float(np.abs(ref_fp32).max()),
        "optimized_ops": {name: optimized_ops(path, tmp) for name, path in paths.items()},
        "file_bytes": {name: path.stat().st_size for name, path in paths.items()},
    }


def main() -> None:
    """Run both parts and write the JSON results."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "machine": {"processor": platform.processor(), "onnxruntime": ort.__version__,
                        "threads": 2, "cpus": torch.get_num_threads()},
            "digits_cnn": digits(Path(tmp)),
            "resnet18_224": resnet(Path(tmp)),
        }  # fmt: skip
    atomic_write_text(RESULTS, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
