"""compactml prune: the artifact, the ONNX file and the report, and one-line errors."""

import json

import numpy as np
import pytest
import torch

import compactml as cml
from compactml import examples
from compactml.export import ort
from compactml.prune import sparsity


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy machine, threads waiting on each other make the latency
    runs of the command (and so these tests) many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return examples.load("digits-cnn", progress=False)


def test_magnitude_writes_a_sparse_artifact_onnx_and_a_report(cli, tmp_path, digits):
    model, task = digits
    out = tmp_path / "mag"
    report = cli.json(
        "prune", "digits-cnn", "--method", "magnitude", "--sparsity", "0.5", "-o", str(out)
    )
    for name in ("model.cml", "model.onnx", "report.json", "report.html", "report.md"):
        assert (out / name).is_file(), name
    loaded = cml.load(out / "model.cml")
    measured = sparsity(loaded)
    assert set(measured.layers) == {
        "features.conv1",
        "features.conv2",
        "features.conv3",
        "classifier",
    }
    assert all(abs(share - 0.5) < 0.02 for share in measured.layers.values()), measured.layers
    assert report["profile"]["nonzero_params"] < 0.6 * report["profile"]["params"]
    assert json.loads((out / "report.json").read_text())["notes"] == report["notes"]
    assert any(note.startswith("ONNX Runtime latency") for note in report["notes"])
    assert report["metrics"]["top1"] > 0.5 and report["reference_metrics"]["top1"] > 0.95
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # the model, its artifact and its ONNX file compute the same thing; the input is untouched
    inputs = next(task.batches("eval", 1))[0][:8]
    with torch.inference_mode():
        expected = loaded(inputs)
        assert not torch.equal(expected, model(inputs))
    onnx_out = ort.run(ort.session(out / "model.onnx"), inputs)[0]
    np.testing.assert_allclose(onnx_out, expected.numpy(), atol=1e-4)
    assert sparsity(model).total == 0.0


def test_nm_keeps_two_of_every_four_weights(cli, tmp_path):
    out = tmp_path / "nm"
    report = cli.json("prune", "digits-cnn", "--method", "nm", "--no-onnx", "-o", str(out))
    assert not (out / "model.onnx").exists()
    loaded = cml.load(out / "model.cml")
    weight = loaded.classifier.weight.detach()
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    assert int(groups.max()) <= 2 and int(groups.min()) == 2
    conv = loaded.features.conv2.weight.detach()  # groups run along the input channels
    nonzero = (conv.permute(0, 2, 3, 1).reshape(-1, conv.shape[1] // 4, 4) != 0).sum(-1)
    assert int(nonzero.max()) == 2
    # the first convolution has one input channel: skipped and said so
    assert any("features.conv1" in note and "divisible" in note for note in report["notes"])
    assert sparsity(loaded).layers["features.conv1"] == 0.0


def test_iterative_schedule_fine_tunes_between_steps(cli, tmp_path):
    out = tmp_path / "it"
    args = ["prune", "digits-cnn", "--method", "magnitude", "--sparsity", "0.8"]
    report = cli.json(*args, "--steps", "2", "--epochs", "1", "--no-onnx", "-o", str(out))
    measured = sparsity(cml.load(out / "model.cml"))
    assert all(abs(share - 0.8) < 0.02 for share in measured.layers.values()), measured.layers
    # one-shot 80% leaves digits-cnn near chance (about 13% top-1); fine-tuning between the
    # steps recovers most of the dense accuracy
    assert report["metrics"]["top1"] >= 0.85


def test_fine_tuning_after_one_shot_keeps_the_masks(cli, tmp_path):
    out = tmp_path / "ft"
    args = ["prune", "digits-cnn", "--method", "magnitude", "--sparsity", "0.7", "--epochs", "1"]
    cli.json(*args, "--no-onnx", "-o", str(out))
    measured = sparsity(cml.load(out / "model.cml"))
    assert all(abs(share - 0.7) < 0.02 for share in measured.layers.values()), measured.layers


def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path):
    out = tmp_path / "bad"
    base = ["prune", "digits-cnn", "-o", str(out), "--no-onnx"]
    cli.error([*base, "--method", "magnitude", "--sparsity", "1.5"], "[0, 1)")
    cli.error([*base, "--method", "magnitude"], "needs --sparsity")
    cli.error([*base, "--method", "taylor"], "needs --sparsity")
    cli.error([*base, "--method", "channels"], "needs --ratio")
    cli.error([*base, "--method", "lottery", "--sparsity", "0.5"], "unknown method")
    cli.error([*base, "--method", "nm", "--n", "4", "--m", "2"], "greater than m")
    assert not out.exists()
    # a method that finds nothing to prune is an error, not an unchanged artifact
    cli.error([*base, "--method", "heads", "--ratio", "0.5"], "no attention heads")
    args = [*base, "--method", "channels", "--ratio", "0.5", "--exclude", "features"]
    cli.error(args, "classifier")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    args = ["prune", "digits-cnn", "--method", "nm", "-o", str(tmp_path / "file")]
    cli.error(args, "is a file")
