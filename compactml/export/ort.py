"""Running exported ONNX files in ONNX Runtime: sessions, feeds, and latency.

Every setting that changes speed is explicit and recorded, never left to ONNX Runtime's
machine-dependent defaults: the CPU execution provider, ``intra_op_num_threads`` (default
:data:`DEFAULT_THREADS`), one inter-op thread, sequential execution, and
``ORT_ENABLE_ALL`` graph optimizations. ``session_settings(session)`` reads them back for
reports.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from compactml.errors import CompactMLError, first_line
from compactml.export.onnx import input_names

DEFAULT_THREADS = 2
PROVIDER = "CPUExecutionProvider"
OPTIMIZATION = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
#: ORT 1.32 fuses weight DequantizeLinear + MatMul (float activations) into MatMulNBits; its own
#: default (4) then quantizes activations to int8 (about 0.5% error). 0 keeps float32
#: accumulation, so int8/4-bit weight-only graphs match PyTorch; export's accuracy_level sets
#: the MatMulNBits nodes compactml writes itself.
QDQ_MATMULNBITS_ACCURACY_LEVEL = 0


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for the ONNX file at ``path``, using ``threads`` intra-op
    threads (default :data:`DEFAULT_THREADS`) and all graph optimizations."""
    threads = DEFAULT_THREADS if threads is None else int(threads)
    if threads < 1:
        raise CompactMLError(f"threads must be at least 1, got {threads}")
    if not Path(path).is_file():
        raise CompactMLError(f"ONNX file {path} does not exist; export the model first")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry(
        "session.qdq_matmulnbits_accuracy_level", str(QDQ_MATMULNBITS_ACCURACY_LEVEL)
    )
    try:
        sess = ort.InferenceSession(str(path), options, providers=[PROVIDER])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph...)
        raise CompactMLError(
            f"ONNX Runtime cannot load {path} ({first_line(exc)}); re-export the model"
        ) from exc
    object.__setattr__(sess, "_compactml_threads", threads)
    return sess


def session_settings(sess: ort.InferenceSession) -> dict[str, Any]:
    """The settings a session was made with (for reports)."""
    return {
        "provider": PROVIDER,
        "threads": getattr(sess, "_compactml_threads", None),
        "inter_op_threads": 1,
        "graph_optimization": str(OPTIMIZATION).rsplit(".", 1)[-1],
        "qdq_matmulnbits_accuracy_level": QDQ_MATMULNBITS_ACCURACY_LEVEL,
        "onnxruntime": ort.__version__,
    }


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)


def feeds(sess: ort.InferenceSession, example_input: Any) -> dict[str, np.ndarray]:
    """``example_input`` (tensor, tuple or dict, as given to ``export``) as ORT feeds, by the
    session's input names; inputs the exported graph does not use are left out."""
    names = input_names(example_input)
    if isinstance(example_input, dict):
        values = list(example_input.values())
    elif isinstance(example_input, (tuple, list)):
        values = list(example_input)
    else:
        values = [example_input]
    given = dict(zip(names, values, strict=True))
    wanted = [i.name for i in sess.get_inputs()]
    missing = [name for name in wanted if name not in given]
    if missing:
        raise CompactMLError(
            f"the ONNX model needs input(s) {', '.join(missing)} but got {', '.join(names)}; "
            "pass the inputs the model was exported with"
        )
    return {name: _as_array(given[name]) for name in wanted}


def run(sess: ort.InferenceSession, example_input: Any) -> list[np.ndarray]:
    """Run ``sess`` on ``example_input``; returns every output as a numpy array."""
    inputs = feeds(sess, example_input)
    try:
        return sess.run(None, inputs)
    except Exception as exc:  # ORT raises its own exception types
        shapes = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in inputs.items())
        raise CompactMLError(
            f"ONNX Runtime failed on inputs {{{shapes}}} ({first_line(exc)}); pass inputs "
            "shaped like the export's example input"
        ) from exc


def latency(
    sess: ort.InferenceSession, inputs: Any, repeats: int = 30, warmup: int = 5
) -> dict[str, Any]:
    """Wall-clock time of one ``sess.run`` on ``inputs``, in milliseconds: median, 10th and 90th
    percentiles over ``repeats`` runs after ``warmup`` unmeasured ones."""
    if repeats < 1 or warmup < 0:
        raise CompactMLError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    prepared = feeds(sess, inputs)
    run(sess, inputs)  # errors surface as CompactMLError before timing
    for _ in range(warmup):
        sess.run(None, prepared)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, prepared)
        times.append((time.perf_counter() - start) * 1000.0)
    q = np.percentile(times, [10, 90])
    return {
        "median_ms": statistics.median(times),
        "p10_ms": float(q[0]),
        "p90_ms": float(q[1]),
        "repeats": repeats,
        "threads": getattr(sess, "_compactml_threads", None),
    }
