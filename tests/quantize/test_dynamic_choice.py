"""``Dynamic(per_tensor="auto")``: per-tensor layers chosen from calibration data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compactml.config import history
from compactml.errors import CompactMLError
from compactml.quantize import Dynamic, DynamicQuantLinear, quantize
from compactml.task import Task
from compactml.techniques import technique_from_dict


class SharedAndSpread(nn.Module):
    """``a`` and ``b`` read the same tensor of 0/1 features, which per-token and per-tensor
    quantization both represent exactly (so per tensor costs nothing there). ``c`` reads the
    same features with every other token scaled by 1e-3: one scale for the whole tensor rounds
    those tokens to zero, and the per-token normalization of ``c``'s output makes that loss
    visible in the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)
        self.c = nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(x.shape[1], 1)
        scale[1::2] = 1e-3
        return self.a(x) + self.b(x) + F.normalize(self.c(x * scale), dim=-1)


def binary_batches(count: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        x = (torch.rand(3, 6, 16, generator=gen) > 0.5).float()
        x[..., 0] = 1.0  # every token's largest value is 1
        batches.append(x)
    return batches


def test_auto_puts_the_shared_harmless_input_per_tensor_and_keeps_the_spread_one_per_token():
    torch.manual_seed(0)
    model = SharedAndSpread().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = Task(calib=binary_batches())
    q = quantize(model, Dynamic(per_tensor="auto", progress=False), task)
    assert (q.a.activation, q.b.activation, q.c.activation) == ("tensor", "tensor", "token")
    entry = history(q)[-1]
    assert entry["per_tensor"] == ["a", "b"]
    selection = entry["selection"]
    assert selection["groups"] == 2 and selection["groups_per_tensor"] == 1  # a and b together
    assert selection["output_error"] <= selection["output_error_per_token"] * 1.1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.a) is nn.Linear
    # what was rejected really is worse: c per tensor multiplies the output error
    worse = quantize(model, Dynamic(per_tensor=("a", "b", "c")))
    x = binary_batches(1)[0]
    ref = model(x)
    assert (worse(x) - ref).norm() > 10 * (q(x) - ref).norm()


def test_a_large_tolerance_takes_every_layer_and_zero_keeps_them_per_token():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    # tokens of very different sizes: per tensor always costs something here
    task = Task(calib=[torch.randn(4, 5, 16) * torch.rand(4, 5, 1) * 10 for _ in range(2)])
    loose = quantize(mlp, Dynamic(per_tensor="auto", tolerance=100, progress=False), task)
    assert [loose[0].activation, loose[2].activation] == ["tensor", "tensor"]
    assert history(loose)[-1]["selection"]["candidates_evaluated"] == 2  # none and all
    # one layer whose tokens span three orders of magnitude: per tensor is clearly worse
    layer = nn.Linear(16, 8).eval()
    spread = Task(calib=[torch.randn(4, 5, 16) * 10 ** (3 * torch.rand(4, 5, 1)) for _ in "ab"])
    strict = quantize(layer, Dynamic(per_tensor="auto", tolerance=0, progress=False), spread)
    assert strict.activation == "token" and history(strict)[-1]["per_tensor"] == []
    x = torch.randn(2, 5, 16)
    assert torch.equal(strict(x), quantize(layer, Dynamic())(x))


def test_auto_needs_calibration_data_and_checks_its_options():
    model = SharedAndSpread().eval()
    for task in (None, Task(eval=[])):
        with pytest.raises(CompactMLError, match=r"per_tensor='auto'\) chooses layers from"):
            quantize(model, Dynamic(per_tensor="auto"), task)
    with pytest.raises(CompactMLError, match="cannot run the model on the calibration batch"):
        quantize(model, Dynamic(per_tensor="auto", progress=False), Task(calib=[torch.ones(2, 3)]))
    for bad in (-0.1, "0.1", True, float("nan")):
        with pytest.raises(CompactMLError, match="tolerance must be a number from 0 to 100"):
            Dynamic(per_tensor="auto", tolerance=bad)
    with pytest.raises(CompactMLError, match="calib_batches"):
        Dynamic(per_tensor="auto", calib_batches=0)
    config = technique_from_dict("dynamic", {"per_tensor": "auto", "tolerance": 0.2})
    assert config == Dynamic(per_tensor="auto", tolerance=0.2)
    assert config.per_tensor == "auto"


def test_auto_on_a_single_layer_model():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).eval()
    q = quantize(layer, Dynamic(per_tensor="auto", progress=False), Task(calib=binary_batches()))
    assert isinstance(q, DynamicQuantLinear) and q.activation == "tensor"  # exact both ways
