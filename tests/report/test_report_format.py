"""Number formats and the Markdown report."""

import pytest

from compactml.errors import CompactMLError
from compactml.report import human_bytes, human_count, percent, render_markdown


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (1_572_864, "1.50 MiB"),
        (1024**2 - 1, "1.00 MiB"),  # rounds up into the next unit, never "1024.00 KiB"
        (3 * 1024**3, "3.00 GiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1234, "1.2 K"),
        (1_200_000, "1.2 M"),
        (999_950, "1.0 M"),
        (3_400_000_000, "3.4 G"),
    ],
)
def test_human_count(n, text):
    assert human_count(n) == text


def test_percent_has_two_decimals():
    assert percent(0.9512) == "95.12%"
    assert percent(1) == "100.00%"


def test_markdown_has_every_section_of_a_full_report(report):
    md = render_markdown(report)
    for heading in ("Summary", "Device fit", "Metrics", "Layers", "Artifact", "Notes"):
        assert f"\n## {heading}\n" in md
    assert md.startswith("# Digits CNN, int8\n")
    assert "| Stored size | 1.50 MiB (1,572,864 bytes) |" in md
    assert "| MACs per inference | 12.3 M (12,345,678) |" in md
    assert "1.234 ms median (p10 1.100 ms, p90 1.500 ms); 2 thread(s), batch 1" in md
    assert "| Peak activation memory | 20.00 KiB (20,480 bytes) |" in md
    assert "Energy per inference (estimate)" in md and "'horowitz-45nm'" in md
    assert "Fits: no" in md
    assert "| Flash | 1.53 MiB (1,600,000 bytes) | 1.00 MiB (1,048,576 bytes) | 152.59% |" in md
    assert "-538.50 KiB (-551,424 bytes) | -52.59% |" in md
    assert "| RAM | 20.00 KiB (20,480 bytes) | 320.00 KiB (327,680 bytes) | 6.25% |" in md
    assert "| SHA-256 | " + "ab" * 32 + " |" in md
    assert "| Key id | key-2024 |" in md
    assert "- first note" in md


def test_markdown_per_layer_rows_and_share_of_bytes(report):
    md = render_markdown(report)
    assert "| features.0 | Conv2d | 1,000 | 1.00 KiB | 100.0 K | 16.67% |" in md
    assert "| features.1 | Conv2d | 2,000 | 2.00 KiB | 200.0 K | 33.33% |" in md
    assert "| features.2 | Conv2d | 3,000 | 3.00 KiB | 300.0 K | 50.00% |" in md
    assert "![Stored bytes per layer](per_layer_size.png)" in md


def test_markdown_metrics_are_percents(report):
    md = render_markdown(report)
    assert "| Top-1 accuracy | 95.00% |" in md
    assert "| Top-5 accuracy | 100.00% |" in md
    assert "| Expected calibration error | 2.10% |" in md
    assert "| Negative log-likelihood (nats) | 0.1800 |" in md
    classes = [line.split(" | ")[0] for line in md.splitlines() if line.endswith("% |")]
    assert classes.index("| 2") < classes.index("| 10")  # class ids sort as numbers
    assert "| 1 | 81.25% |" in md
    assert "| 0.1 | 85.00% |" in md
    assert "![Top-1 accuracy versus input noise sigma](accuracy_vs_noise.png)" in md
    assert "Difference" not in md


def test_markdown_reference_comparison_shows_the_difference(report, reference):
    report["reference_metrics"] = reference
    md = render_markdown(report)
    assert "| Metric | Compressed | Original | Difference |" in md
    assert "| Top-1 accuracy | 95.00% | 96.25% | -1.25 pp |" in md
    assert "| Negative log-likelihood (nats) | 0.1800 | 0.1500 | +0.0300 |" in md
    assert "| Samples | 360 | 360 | +0 |" in md
    assert "| 2 | 50.00% | 75.00% | -25.00 pp |" in md
    assert "| 0.1 | 85.00% | 93.00% | -8.00 pp |" in md
    assert "| Top-1 agreement with original | 97.00% | — | — |" in md


def test_markdown_of_title_and_model_only():
    md = render_markdown({"title": "Only", "model": "m"})
    assert md == "# Only\n\n## Overview\n\n- Model: m\n"


def test_missing_parts_are_left_out(report):
    report["profile"].update(latency=None, target=None, energy=None, layers=[])
    del report["metrics"]["noise"], report["metrics"]["per_class_accuracy"]
    report["artifact"] = None
    md = render_markdown(report)
    assert "Latency" not in md and "Device fit" not in md and "Energy" not in md
    assert "## Layers" not in md and ".png" not in md and "Accuracy per class" not in md
    assert "## Artifact" not in md
    assert "| Stored size | 1.50 MiB (1,572,864 bytes) |" in md


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        (
            {"kind": "embedding", "queries": 100, "recall@1": 0.8, "recall@10": 0.99, "mrr": 0.87},
            [
                "| Recall@1 | 80.00% |",
                "| Recall@10 | 99.00% |",
                "| Mean reciprocal rank | 0.8700 |",
            ],
        ),
        (
            {"kind": "language_model", "tokens": 4096, "nll": 2.5, "perplexity": 12.1825},
            ["| Tokens | 4,096 |", "| Perplexity | 12.1825 |"],
        ),
        (
            {"kind": "custom", "f1": 0.5, "steps": 7, "label": "text"},
            ["| f1 | 0.5000 |", "| steps | 7 |"],
        ),
    ],
)
def test_markdown_metric_kinds(metrics, expected):
    md = render_markdown({"title": "t", "model": "m", "metrics": metrics})
    for line in expected:
        assert line in md


def test_markdown_escapes_table_breaking_text(report):
    report["profile"]["layers"][0]["name"] = "odd|name<b>"
    md = render_markdown(report)
    row = next(line for line in md.splitlines() if "odd" in line)
    assert row.startswith("| odd\\|name\\<b\\> | Conv2d |")
    assert "- second \\| note" in md


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"title": "t"},
        {"title": "t", "model": 3},
        {"title": "t", "model": "m", "profile": [1]},
        {"title": "t", "model": "m", "notes": "one note"},
    ],
)
def test_bad_report_is_a_user_error(bad):
    with pytest.raises(CompactMLError, match="report"):
        render_markdown(bad)
