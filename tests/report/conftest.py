"""A complete report dict, as the CLI builds it, for the report tests."""

import pytest


def _layers(count: int) -> list[dict]:
    return [
        {
            "name": f"features.{i}",
            "type": "Conv2d",
            "params": 1000 * (i + 1),
            "nonzero_params": 900 * (i + 1),
            "stored_bytes": 1024 * (i + 1),
            "macs": 100_000 * (i + 1),
            "output_shape": [1, 8, 8, 8],
        }
        for i in range(count)
    ]


def _make_report(layers: int = 3) -> dict:
    """A report with every section filled; a fresh dict on every call."""
    return {
        "title": "Digits CNN, int8",
        "model": "digits-cnn",
        "created": "2024-05-01T12:00:00+00:00",
        "compactml_version": "0.1.0",
        "profile": {
            "params": 123_456,
            "nonzero_params": 61_728,
            "stored_bytes": 1_572_864,
            "macs": 12_345_678,
            "latency": {
                "median_ms": 1.234,
                "p10_ms": 1.1,
                "p90_ms": 1.5,
                "repeats": 50,
                "warmup": 5,
                "threads": 2,
                "batch_size": 1,
                "runtime": "pytorch-eager",
            },
            "peak_activation_bytes": 20_480,
            "peak_activation_note": None,
            "energy": {
                "total_uj": 1500.0,
                "compute_uj": 1000.0,
                "memory_uj": 500.0,
                "estimate": True,
                "table": "horowitz-45nm",
            },
            "layers": _layers(layers),
            "target": {
                "name": "stm32f746",
                "description": "Cortex-M7, 1 MiB flash, 320 KiB RAM",
                "flash_bytes": 1_048_576,
                "ram_bytes": 327_680,
                "needs_flash_bytes": 1_600_000,
                "needs_ram_bytes": 20_480,
                "flash_margin_bytes": 1_048_576 - 1_600_000,
                "ram_margin_bytes": 327_680 - 20_480,
                "fits": False,
            },
        },
        "metrics": {
            "kind": "classification",
            "samples": 360,
            "top1": 0.95,
            "top5": 1.0,
            "nll": 0.18,
            "ece": 0.021,
            "brier": 0.08,
            "per_class_accuracy": {"0": 0.9, "1": 0.8125, "10": 1.0, "2": 0.5},
            "agreement": 0.97,
            "noise": [{"sigma": 0.0, "top1": 0.95}, {"sigma": 0.1, "top1": 0.85}],
        },
        "reference_metrics": None,
        "artifact": {
            "path": "out/model.cml",
            "bytes": 1_572_900,
            "sha256": "ab" * 32,
            "signed": True,
            "verified": True,
            "key_id": "key-2024",
        },
        "notes": ["first note", "second | note"],
    }


def _reference_metrics() -> dict:
    """Metrics of the original model, for comparison with make_report()["metrics"]."""
    return {
        "kind": "classification",
        "samples": 360,
        "top1": 0.9625,
        "top5": 1.0,
        "nll": 0.15,
        "ece": 0.02,
        "brier": 0.07,
        "per_class_accuracy": {"0": 0.95, "1": 0.875, "10": 1.0, "2": 0.75},
        "noise": [{"sigma": 0.0, "top1": 0.9625}, {"sigma": 0.1, "top1": 0.93}],
    }


@pytest.fixture
def report() -> dict:
    """A complete report without reference metrics."""
    return _make_report()


@pytest.fixture
def make_report():
    """A function (layers=3) -> a complete report, for tests that need more layers."""
    return _make_report


@pytest.fixture
def reference() -> dict:
    """Metrics of the original model, to compare with report["metrics"]."""
    return _reference_metrics()
