"""ONNX export of float models: outputs match PyTorch, inputs are named, files are safe.

Compressed-layer lowerings are tested in ``test_onnx_lowering.py``.
"""

from __future__ import annotations

import importlib
import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compactml.errors import CompactMLError
from compactml.examples import digits_cnn
from compactml.export import ort as cort
from compactml.export.onnx import export
from compactml.source import set_source

# cml.export (the function) shadows the compactml.export package as an attribute, so reach the
# module through the import system rather than a dotted attribute path.
ONNX_MODULE = importlib.import_module("compactml.export.onnx")


class ResidualCNN(nn.Module):
    """A ResNet-style block: conv-BN-ReLU, a residual add, global pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 1, stride=2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(h + self.conv(h))
        return self.fc(self.down(h).mean((2, 3)))


class TokenModel(nn.Module):
    """Hugging Face style inputs: ids and an attention mask, masked mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(input_ids))
        mask = attention_mask.unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)


def _token_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, 40, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, seq // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _ort_output(path, inputs) -> np.ndarray:
    return cort.run(cort.session(path, threads=1), inputs)[0]


def _torch_output(model: nn.Module, inputs) -> np.ndarray:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.numpy()


def test_digits_cnn_matches_pytorch(tmp_path):
    model, task = digits_cnn.load(progress=False)
    path = export(model, tmp_path / "digits.onnx", task.example_input())
    images = next(task.batches("eval"))[0]
    got = _ort_output(path, images)
    assert np.abs(got - _torch_output(model, images)).max() < 1e-5
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]


def test_residual_cnn_matches_with_another_batch_size(tmp_path):
    torch.manual_seed(0)
    model = ResidualCNN().eval()
    path = export(model, tmp_path / "res.onnx", torch.randn(1, 3, 16, 16))
    x = torch.randn(5, 3, 16, 16)  # dynamic batch: not the example's batch size
    assert np.abs(_ort_output(path, x) - _torch_output(model, x)).max() < 1e-5


def test_static_batch_refuses_other_batch_sizes(tmp_path):
    model = ResidualCNN().eval()
    path = export(model, tmp_path / "res.onnx", torch.randn(1, 3, 16, 16), dynamic_batch=False)
    with pytest.raises(CompactMLError, match="ONNX Runtime failed"):
        _ort_output(path, torch.randn(2, 3, 16, 16))


def test_dict_inputs_are_named_by_keys_with_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    model = TokenModel().eval()
    path = export(model, tmp_path / "tokens.onnx", _token_batch(1, 6))
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]
    inputs = _token_batch(3, 11)
    assert np.abs(_ort_output(path, inputs) - _torch_output(model, inputs)).max() < 1e-5


def test_tuple_outputs_are_numbered(tmp_path):
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y, x * y

    path = export(Two(), tmp_path / "two.onnx", (torch.ones(2, 3), torch.ones(2, 3)))
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["input_0", "input_1"]
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
    outs = cort.run(cort.session(path), (torch.full((2, 3), 2.0), torch.full((2, 3), 3.0)))
    assert np.allclose(outs[0], 5.0) and np.allclose(outs[1], 6.0)


def test_export_does_not_change_the_model(tmp_path):
    model = ResidualCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export(model, tmp_path / "res.onnx", torch.randn(2, 3, 8, 8))
    assert model.training and model.bn.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_the_models_own_file(tmp_path):
    own = tmp_path / "model.onnx"
    own.write_bytes(b"original")
    model = set_source(ResidualCNN(), {"kind": "builtin", "name": "x"}, path=str(own))
    with pytest.raises(CompactMLError, match="is the input file"):
        export(model, own, torch.randn(1, 3, 8, 8))
    assert own.read_bytes() == b"original"


@pytest.mark.parametrize("name", ["m.tflite", "m.c"])
def test_planned_formats_are_refused(tmp_path, name):
    with pytest.raises(CompactMLError, match="not supported yet; export to .onnx"):
        export(ResidualCNN(), tmp_path / name, torch.randn(1, 3, 8, 8))


def test_unknown_suffix_lists_formats(tmp_path):
    with pytest.raises(CompactMLError, match=r"\.onnx"):
        export(ResidualCNN(), tmp_path / "m.pt", torch.randn(1, 3, 8, 8))


def test_wrong_example_input_is_a_user_error(tmp_path):
    with pytest.raises(CompactMLError, match="cannot run on the example input"):
        export(ResidualCNN(), tmp_path / "m.onnx", torch.randn(1, 5, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


def test_failed_write_leaves_no_files(tmp_path, monkeypatch):
    target = tmp_path / "res.onnx"
    target.write_bytes(b"previous export")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("compactml.io.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        export(ResidualCNN(), target, torch.randn(1, 3, 8, 8))
    assert sorted(os.listdir(tmp_path)) == ["res.onnx"]
    assert target.read_bytes() == b"previous export"


def test_failed_check_leaves_no_files(tmp_path, monkeypatch):
    def invalid(proto):
        raise onnx.checker.ValidationError("bad graph")

    monkeypatch.setattr(ONNX_MODULE.onnx.checker, "check_model", invalid)
    with pytest.raises(CompactMLError, match="bad graph"):
        export(ResidualCNN(), tmp_path / "res.onnx", torch.randn(1, 3, 8, 8))
    assert os.listdir(tmp_path) == []


def test_models_over_two_gib_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ONNX_MODULE, "MAX_BYTES", 1000)
    with pytest.raises(CompactMLError, match="up to 2 GiB"):
        export(ResidualCNN(), tmp_path / "res.onnx", torch.randn(1, 3, 8, 8))
    assert os.listdir(tmp_path) == []
