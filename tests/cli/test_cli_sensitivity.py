"""compactml sensitivity: the per-layer scan, its ranking, the report with the curves."""

import json

import pytest

import compactml as cml
from compactml import examples
from compactml.cli import main
from compactml.prune import Magnitude

PNG = b"\x89PNG\r\n\x1a\n"
LAYERS = ["features.conv1", "features.conv2", "features.conv3", "classifier"]


def test_magnitude_scan_writes_the_table_and_the_curves(cli, tmp_path):
    out = tmp_path / "sens"
    args = ["sensitivity", "digits-cnn", "--method", "magnitude", "--levels", "0.5,0.9"]
    report = cli.json(*args, "-o", str(out), "--batches", "1")
    data = report["sensitivity"]
    # the same numbers as the Python API on the same data
    model, task = examples.load("digits-cnn", progress=False)
    table = cml.sensitivity(model, task, Magnitude(sparsity=0.5), [0.5, 0.9], batches=1)
    assert data == json.loads(json.dumps(table.to_dict()))
    assert (data["technique"], data["level_name"], data["levels"]) == (
        "Magnitude",
        "sparsity",
        [0.5, 0.9],
    )
    assert [row["layer"] for row in data["rows"]][::2] == LAYERS
    # the ranking at 90% names the most damaged layer first
    ranking = next(note for note in report["notes"] if note.startswith("At sparsity 0.9"))
    assert ranking.split(": ", 1)[1].startswith(table.ranking(0.9)[-1] + " ")
    saved = json.loads((out / "report.json").read_text())
    assert saved["sensitivity"] == data
    assert (out / "sensitivity.png").read_bytes().startswith(PNG)
    md = (out / "report.md").read_text()
    assert "## Sensitivity" in md and "| Layer | sparsity 0.5 | sparsity 0.9 |" in md
    cells = [f"{row['top1'] * 100:.2f}%" for row in data["rows"] if row["layer"] == "classifier"]
    assert f"| classifier | {cells[0]} | {cells[1]} |" in md
    assert "(sensitivity.png)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 and "Sensitivity" in html


def test_int_weight_scan_of_chosen_layers_by_bits(cli, tmp_path):
    args = ["sensitivity", "digits-cnn", "--method", "int-weight", "--levels", "8,2"]
    args += ["--layers", "features.conv2,classifier", "--batches", "1", "-o", str(tmp_path)]
    data = cli.json(*args)["sensitivity"]
    assert (data["technique"], data["level_name"], data["levels"]) == ("WeightOnly", "bits", [8, 2])
    assert {row["layer"] for row in data["rows"]} == {"features.conv2", "classifier"}
    at8 = [row["damage"] for row in data["rows"] if row["bits"] == 8]
    assert all(abs(damage) <= 0.01 for damage in at8)  # 8-bit weights cost (almost) nothing
    assert (tmp_path / "sensitivity.png").is_file()


def test_nm_scan_varies_n_and_reports_layers_it_cannot_prune(cli, tmp_path):
    args = ["sensitivity", "digits-cnn", "--method", "nm", "--levels", "1,3", "--m", "4"]
    args += ["--layers", "features.conv1,features.conv2", "--batches", "1", "-o", str(tmp_path)]
    report = cli.json(*args)
    rows = report["sensitivity"]["rows"]
    assert report["sensitivity"]["level_name"] == "n"
    conv1 = [row for row in rows if row["layer"] == "features.conv1"]
    assert len(conv1) == 2 and all(row["top1"] is None and row["error"] for row in conv1)
    conv2 = {row["n"]: row["damage"] for row in rows if row["layer"] == "features.conv2"}
    assert conv2[1] > conv2[3]  # keeping 1 of 4 hurts more than keeping 3 of 4
    md = (tmp_path / "report.md").read_text()
    assert "| features.conv1 | failed | failed |" in md
    assert f"- features.conv1 at n 1: {conv1[0]['error']}" in md


FACTORY = """
from torch import nn

def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
"""


def test_bad_input_is_one_line(cli, tmp_path):
    out = tmp_path / "bad"
    base = ["sensitivity", "digits-cnn", "-o", str(out), "--batches", "1"]
    magnitude = [*base, "--method", "magnitude"]
    cli.error(magnitude, "needs levels")
    cli.error([*magnitude, "--levels", ""], "needs levels")
    cli.error([*magnitude, "--levels", "0.5,high"], "'high' is not a number")
    cli.error([*magnitude, "--levels", "0.5,,0.7"], "'' is not a number")
    cli.error([*magnitude, "--levels", "0.5,0.5"], "repeats a level")
    cli.error([*magnitude, "--levels", "0.5,1.5"], "sparsity 1.5")
    cli.error([*base, "--method", "int-weight", "--levels", "4,9"], "bits 9")
    cli.error([*base, "--method", "gptq", "--levels", "4"], "unknown method 'gptq'")
    cli.error([*magnitude, "--levels", "0.5", "--layers", "nope"], "'nope'")
    cli.error([*magnitude, "--levels", "0.5", "--measure", "vibes"], "measure")
    one = ["--method", "nm", "--levels", "2", "--layers", "features.conv1"]
    # --quiet: the finished progress bar is not part of the error
    cli.error([*base, *one, "--quiet"], "could not compress any layer")
    assert not out.exists()
    factory = tmp_path / "net.py"
    factory.write_text(FACTORY)
    args = ["sensitivity", f"{factory}:build", "--method", "magnitude", "--levels", "0.5"]
    cli.error([*args, "-o", str(out)], "no built-in task")


@pytest.mark.parametrize("method", ["magnitude", "int-weight"])
def test_human_output_prints_the_table_and_the_ranking(capsys, tmp_path, method):
    levels = "0.5" if method == "magnitude" else "4"
    args = ["sensitivity", "digits-cnn", "--method", method, "--levels", levels]
    code = main([*args, "--layers", "classifier", "--batches", "1", "-o", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Sensitivity" in out and "classifier" in out and "most to least sensitive" in out
    assert f"report written to {tmp_path / 'report.html'}" in out.replace("\n", "")
