"""Static INT8: quality on digits-cnn and ONNX Runtime speed on a ResNet-18-shaped network.

1. digits-cnn (fp32 top-1 0.9889): ``Static`` with each observer; top-1 of the PyTorch model
   and of its ONNX export in ONNX Runtime, the drop against fp32, and the ``.cml`` artifact size
   against the fp32 artifact.
2. ResNet-18 shape (:func:`compactml.examples.resnet.resnet18`: random weights, randomized
   BatchNorm statistics, 224x224, 1000 classes), calibrated on 8 random normal images: ORT
   latency (2 threads, batch 1 and 8) of the fp32 ONNX file, of compactml ``Static`` (minmax)
   exported, and of ``onnxruntime.quantization.quantize_static`` on the same fp32 file with the
   same calibration data (QDQ and QOperator formats, uint8 activations, int8 per-channel
   weights, minmax); top-1 agreement with fp32 on 16 more images of the calibration
   distribution; which ops ORT's optimized graph runs.

:func:`resnet` is also called by ``benchmarks/quantization.py``. Run
``.venv/bin/python benchmarks/static_int8.py`` (a few minutes on 2 cores); writes
``benchmarks/results/static_int8.json``.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import THREADS, add_speedups, interleaved, machine_info, ort_timer, write_results

from compactml.evaluate import evaluate
from compactml.examples import digits_cnn
from compactml.examples.resnet import resnet18
from compactml.export import ort as cort
from compactml.export.artifact import artifact_bytes
from compactml.export.onnx import export
from compactml.quantize.ptq import Static
from compactml.task import Task

OBSERVERS = ("minmax", "percentile", "mse", "entropy")


def ort_top1(path: Path, task: Task) -> float:
    """Top-1 accuracy of the ONNX file at ``path`` on ``task.eval``."""
    sess, right, total = cort.session(path, THREADS), 0, 0
    for x, y in task.batches("eval"):
        pred = cort.run(sess, x)[0].argmax(1)
        right += int((pred == y.numpy()).sum())
        total += len(y)
    return right / total


def digits(tmp: Path) -> dict:
    """digits-cnn fp32 vs Static with each observer: top-1 (PyTorch and ORT) and sizes."""
    model, task = digits_cnn.load(progress=False)
    fp32_top1 = evaluate(model, task, noise_levels=())["top1"]
    fp32_bytes = len(artifact_bytes(model))
    out = {"fp32": {"top1": fp32_top1, "artifact_bytes": fp32_bytes}}
    for name in OBSERVERS:
        q = Static(observer=name, progress=False).apply(model, task)
        top1 = evaluate(q, task, noise_levels=())["top1"]
        size = len(artifact_bytes(q))
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


def ort_quantize_static(
    fp32: Path, calib: list[torch.Tensor], tmp: Path, fmt: str, input_name: str = "input"
) -> Path:
    """The peer: ``onnxruntime.quantization.quantize_static`` of ``fp32`` (after ORT's
    pre-processing) in format ``fmt`` ("QDQ" or "QOperator"), QUInt8 activations, QInt8
    per-channel weights, MinMax calibration on ``calib``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: x.numpy()} for x in calib])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    pre = tmp / f"{fp32.stem}_pre.onnx"
    if not pre.exists():
        quant_pre_process(str(fp32), str(pre))
    out = tmp / f"{fp32.stem}_ort_{fmt.lower()}.onnx"
    quantize_static(
        str(pre), str(out), Reader(), quant_format=getattr(QuantFormat, fmt),
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
    )  # fmt: skip
    return out


def agreement(paths: dict[str, Path], test: torch.Tensor, reference: np.ndarray) -> dict:
    """Per ONNX file: top-1 agreement and largest logit difference against fp32 PyTorch."""
    quality = {}
    for name, path in paths.items():
        logits = cort.run(cort.session(path, THREADS), test)[0]
        quality[name] = {
            "top1_agreement_vs_fp32": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "max_abs_vs_fp32": float(np.abs(logits - reference).max()),
        }
    return quality


def resnet(tmp: Path, rounds: int = 5, repeats: int = 10, batches: tuple = (1, 8)) -> dict:
    """ResNet-18 at 224x224: latency of fp32, compactml Static and the ORT peers (ms, and
    speed-up vs fp32 ONNX; ``repeats`` runs per round, three times that at batch 1), top-1
    agreement with fp32, optimized ops and file sizes."""
    model = resnet18()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(8)]
    q = Static(progress=False).apply(model, Task(calib=[(x,) for x in calib]))
    test = torch.randn(16, 3, 224, 224, generator=g)
    paths = {
        "fp32": export(model, tmp / "resnet_fp32.onnx", calib[0]),
        "compactml_static": export(q, tmp / "resnet_static.onnx", calib[0]),
    }
    paths["ort_static_qdq"] = ort_quantize_static(paths["fp32"], calib, tmp, "QDQ")
    paths["ort_static_qoperator"] = ort_quantize_static(paths["fp32"], calib, tmp, "QOperator")
    with torch.no_grad():
        reference = model(test).numpy()
    sessions = {name: cort.session(p, THREADS) for name, p in paths.items()}
    latency = {}
    for b in batches:
        n_runs = repeats * 3 if b == 1 else repeats  # batch 1 is fast: more runs per round
        timers = {n: ort_timer(s, test[:b], n_runs) for n, s in sessions.items()}
        latency[f"batch{b}"] = interleaved(timers, rounds)
        add_speedups(latency[f"batch{b}"], "fp32")
    return {
        "calibration": "8 images N(0, 1), 1x3x224x224; agreement on 16 more from the same",
        "compactml_config": "Static(bits=8, observer='minmax', per_channel=True)",
        "peer_config": "quant_pre_process, quantize_static(QUInt8 act, QInt8 per-channel, MinMax)",
        "latency": latency,
        "quality": agreement(paths, test, reference),
        "optimized_ops": {name: optimized_ops(path, tmp) for name, path in paths.items()},
        "onnx_bytes": {name: path.stat().st_size for name, path in paths.items()},
    }


def main() -> None:
    """Run both parts and write the JSON results."""
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "machine": machine_info(),
            "digits_cnn": digits(Path(tmp)),
            "resnet18_224": resnet(Path(tmp)),
        }
    print(f"written to {write_results('static_int8', results)}")


if __name__ == "__main__":
    main()
