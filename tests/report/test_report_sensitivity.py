"""The sensitivity section of a report: table, curves chart, failures and validation."""

import json
import math

import pytest

from compactml.errors import CompactMLError
from compactml.report import render_charts, render_html, render_markdown, write_report
from compactml.report.console import console_blocks
from compactml.report.plots import SENSITIVITY_CHART, sensitivity_curves
from compactml.sensitivity import SensitivityTable

PNG = b"\x89PNG\r\n\x1a\n"


def _table(**changes) -> SensitivityTable:
    fields = dict(
        technique="Magnitude",
        level_name="sparsity",
        levels=(0.5, 0.9),
        measure="metric",
        metric="top1",
        higher_is_better=True,
        baseline=0.98,
        values={
            "conv1": {0.5: 0.97, 0.9: 0.60},
            "conv2": {0.5: 0.9725, 0.9: 0.955},
            "fc|odd": {0.5: 0.98},
            "stem": {},
        },
        failures={
            "fc|odd": {0.9: "width 3 is not divisible"},
            "stem": {0.5: "no weights", 0.9: "no weights"},
        },
        describe="top1 drop on 2 eval batches",
    )
    return SensitivityTable(**(fields | changes))


def _report(**changes) -> dict:
    return {"title": "Scan", "model": "m", "sensitivity": _table(**changes).to_dict()}


def test_markdown_table_is_layer_by_level_with_the_baseline():
    md = render_markdown(_report())
    assert "\n## Sensitivity\n" in md
    assert "Baseline, nothing compressed: top1 98.00%." in md
    assert "top1 drop on 2 eval batches" in md and "(higher is better)" in md
    assert "| Layer | sparsity 0.5 | sparsity 0.9 |\n| --- | ---: | ---: |" in md
    assert "| conv1 | 97.00% | 60.00% |" in md
    assert "| conv2 | 97.25% | 95.50% |" in md
    assert "| fc\\|odd | 98.00% | failed |" in md
    assert "| stem | failed | failed |" in md
    assert "- fc\\|odd at sparsity 0.9: width 3 is not divisible" in md
    assert "- stem at sparsity 0.5: no weights" in md
    assert "![top1 against sparsity, one curve per layer compressed alone](sensitivity.png)" in md


def test_other_metrics_are_plain_numbers_and_levels_keep_their_order():
    values = {"a": {8: 0.001, 4: 0.0123, 2: 0.25}}
    report = _report(
        level_name="bits",
        levels=(8, 4, 2),
        measure="output",
        metric="output_error",
        higher_is_better=False,
        baseline=0.0,
        values=values,
        failures={},
        describe="relative output error on 8 calib batches",
    )
    md = render_markdown(report)
    assert "| Layer | bits 8 | bits 4 | bits 2 |" in md
    assert "| a | 0.0010 | 0.0123 | 0.2500 |" in md
    assert "output_error 0.0000" in md and "(lower is better)" in md
    assert "failed" not in md


def test_non_finite_value_is_a_failure_cell():
    report = _report(values={"a": {0.5: 0.9, 0.9: math.nan}}, failures={})
    assert "| a | 90.00% | failed |" in render_markdown(report)
    assert "a at sparsity 0.9: top1 was nan (not finite)" in render_markdown(report)


def test_curves_put_the_most_sensitive_layer_first_and_leave_out_total_failures():
    curves = sensitivity_curves(_table().to_dict())
    assert list(curves) == ["conv1", "conv2", "fc|odd"]  # damage 0.38, 0.025, 0.0
    assert curves["conv1"] == [(0.5, 0.97), (0.9, 0.6)]
    assert curves["fc|odd"] == [(0.5, 0.98), (0.9, None)]  # a gap where it failed
    assert sensitivity_curves(None) == {} and sensitivity_curves({"rows": "x"}) == {}


def test_chart_is_drawn_only_when_some_layer_was_measured():
    charts = render_charts(_report())
    assert list(charts) == [SENSITIVITY_CHART] and charts[SENSITIVITY_CHART].startswith(PNG)
    failed = {"a": {0.5: "no", 0.9: "no"}}
    report = _report(values={"a": {}}, failures=failed)
    assert render_charts(report) == {}
    md = render_markdown(report)
    assert "| a | failed | failed |" in md and ".png" not in md


def test_html_embeds_the_curves_and_console_shows_the_table():
    html = render_html(_report())
    assert html.count('<img src="data:image/png;base64,') == 1
    assert '<th class="num">sparsity 0.9</th>' in html and "fc|odd" in html
    blocks = console_blocks(_report())
    tables = [block for block in blocks if hasattr(block, "columns")]
    assert [col.header for col in tables[0].columns] == ["Layer", "sparsity 0.5", "sparsity 0.9"]
    assert tables[0].row_count == 4


def test_writer_writes_the_chart_and_removes_a_stale_one(tmp_path):
    paths = write_report(_report(), tmp_path)
    assert paths["sensitivity"] == tmp_path / SENSITIVITY_CHART
    assert paths["sensitivity"].read_bytes().startswith(PNG)
    assert json.loads(paths["json"].read_text())["sensitivity"]["levels"] == [0.5, 0.9]
    write_report({"title": "Later", "model": "m"}, tmp_path)
    assert not (tmp_path / SENSITIVITY_CHART).exists()


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ([1, 2], "'sensitivity' must be a dict"),
        ({"metric": "top1", "rows": []}, "sensitivity.level_name"),
        ({"level_name": "bits", "metric": "", "rows": []}, "sensitivity.metric"),
        ({"level_name": "bits", "metric": "top1", "rows": "x"}, "sensitivity.rows"),
        ({"level_name": "bits", "metric": "top1", "rows": [{"bits": 4}]}, r"rows\[0\]"),
        ({"level_name": "b", "metric": "t", "rows": [], "levels": 4}, "sensitivity.levels"),
        ({"level_name": "b", "metric": "t", "rows": [], "baseline": "x"}, "baseline"),
    ],
)
def test_bad_sensitivity_section_is_a_user_error(section, where, tmp_path):
    report = {"title": "t", "model": "m", "sensitivity": section}
    with pytest.raises(CompactMLError, match=where):
        render_markdown(report)
    with pytest.raises(CompactMLError, match=where):
        write_report(report, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_section_is_left_out():
    report = {"title": "t", "model": "m"}
    report["sensitivity"] = {"level_name": "bits", "metric": "top1", "rows": []}
    assert "Sensitivity" not in render_markdown(report)
