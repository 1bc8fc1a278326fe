"""write_report: the report folder, JSON and atomic replacement."""

import json

import numpy as np
import pytest
import torch

from compactml.errors import CompactMLError
from compactml.report import write_report


def test_writes_all_files_and_json_round_trips(report, tmp_path):
    out = tmp_path / "new" / "report"
    paths = write_report(report, out)
    assert set(paths) == {"json", "markdown", "html", "per_layer_size", "accuracy_vs_noise"}
    assert paths["json"] == out / "report.json" and paths["html"] == out / "report.html"
    assert all(path.is_file() and path.parent == out for path in paths.values())
    assert json.loads(paths["json"].read_text()) == report
    assert paths["json"].read_text() == json.dumps(report, indent=2, sort_keys=True) + "\n"
    assert paths["per_layer_size"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "(per_layer_size.png)" in paths["markdown"].read_text()


def test_numpy_and_torch_values_become_json(tmp_path):
    report = {
        "title": "t",
        "model": "m",
        "metrics": {"kind": "custom", "a": np.float32(0.5), "b": np.int64(3), "c": torch.tensor(2)},
        "notes": ("tuple note",),
        "profile": {"layers": [{"name": "l", "output_shape": torch.Size([1, 4])}]},
    }
    loaded = json.loads(write_report(report, tmp_path)["json"].read_text())
    assert loaded["metrics"] == {"kind": "custom", "a": 0.5, "b": 3, "c": 2}
    assert loaded["notes"] == ["tuple note"]
    assert loaded["profile"]["layers"][0]["output_shape"] == [1, 4]


def test_non_finite_number_is_refused_before_writing(report, tmp_path):
    report["metrics"]["nll"] = float("nan")
    with pytest.raises(CompactMLError, match=r"report\.metrics\.nll is nan"):
        write_report(report, tmp_path / "out")
    report["metrics"]["nll"] = np.float64("inf")
    with pytest.raises(CompactMLError, match="JSON cannot hold"):
        write_report(report, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_type_is_refused(report, tmp_path):
    report["notes"] = [object()]
    with pytest.raises(CompactMLError, match=r"report\.notes\[0\] is a object"):
        write_report(report, tmp_path)


def test_out_dir_that_is_a_file_is_refused(report, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CompactMLError, match="is a file"):
        write_report(report, tmp_path / "file")


def test_rewriting_replaces_files_and_leaves_no_temporaries(report, tmp_path):
    write_report(report, tmp_path)
    second = {"title": "Second", "model": "other"}
    paths = write_report(second, tmp_path)
    assert set(paths) == {"json", "markdown", "html"}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["report.html", "report.json", "report.md"]  # no .tmp, no stale charts
    assert json.loads(paths["json"].read_text()) == second
    assert paths["markdown"].read_text().startswith("# Second\n")
    assert "<img" not in paths["html"].read_text()
