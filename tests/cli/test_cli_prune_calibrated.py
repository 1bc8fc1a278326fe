"""compactml prune --method sparsegpt / wanda: calibrated on the task's calib batches."""

import json
import textwrap

import numpy as np
import pytest
import torch

import compactml as cml
from compactml import examples
from compactml.cli import main
from compactml.export import ort
from compactml.prune import sparsity


def run_json(capsys, *args):
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def expect_error(capsys, args, pattern):
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert pattern in err, err


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the latency runs of the command are much slower on a busy machine
    with threads waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sparsegpt_prunes_the_linear_layers_and_exports(capsys, tmp_path):
    model, task = examples.load("digits-cnn", progress=False)
    out = tmp_path / "sgpt"
    args = ["prune", "digits-cnn", "--method", "sparsegpt", "--sparsity", "0.5", "-o", str(out)]
    report = run_json(capsys, *args)
    loaded = cml.load(out / "model.cml")
    measured = sparsity(loaded).layers
    # digits-cnn's only Linear layer is its classifier: the convolutions are left alone
    assert measured["classifier"] == 0.5
    assert measured["features.conv2"] == 0.0
    assert report["metrics"]["top1"] > 0.8
    inputs = next(task.batches("eval", 1))[0][:8]
    with torch.inference_mode():
        expected = loaded(inputs)
    np.testing.assert_allclose(
        ort.run(ort.session(out / "model.onnx"), inputs)[0], expected.numpy(), atol=1e-4
    )
    assert sparsity(model).total == 0.0


def test_wanda_two_of_four(capsys, tmp_path):
    out = tmp_path / "wanda"
    args = ["prune", "digits-cnn", "--method", "wanda", "--n", "2", "--m", "4", "--no-onnx"]
    run_json(capsys, *args, "-o", str(out))
    weight = cml.load(out / "model.cml").classifier.weight.detach()
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    assert int(groups.max()) == 2 and int(groups.min()) == 2


def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "bad"
    base = ["prune", "digits-cnn", "-o", str(out), "--no-onnx"]
    expect_error(capsys, [*base, "--method", "sparsegpt"], "needs --sparsity")
    args = [*base, "--method", "wanda", "--sparsity", "0.5", "--n", "2", "--m", "4"]
    expect_error(capsys, args, "not both")
    expect_error(capsys, [*base, "--method", "wanda", "--n", "2"], "needs both n and m")
    factory = tmp_path / "net.py"
    factory.write_text(
        textwrap.dedent(
            """
            from torch import nn

            def net():
                return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
            """
        )
    )
    args = ["prune", f"{factory}:net", "--method", "sparsegpt", "--sparsity", "0.5"]
    expect_error(capsys, [*args, "--input-shape", "1,8", "-o", str(out)], "calibration data")
    assert not out.exists()
