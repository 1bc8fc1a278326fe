"""GPTQ: the pure function against round-to-nearest, and the GPTQ config end to end."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from compactml.calib.stats import HessianStats
from compactml.config import history
from compactml.errors import CompactMLError
from compactml.export.artifact import load, save
from compactml.quantize import QuantLinear, WeightOnly, quantize
from compactml.quantize.affine import PerChannel, PerGroup, PerTensor, QScheme
from compactml.quantize.gptq import GPTQ, gptq_quantize
from compactml.quantize.qweight import QWeight
from compactml.task import Task

from ..calib.conftest import MLPNet as Net

SCHEMES = [
    QScheme(4, True, PerGroup(32)),
    QScheme(3, False, PerGroup(16)),
    QScheme(4, True, PerChannel(0)),
    QScheme(8, False, PerTensor()),
]


def _correlated(out: int = 48, inp: int = 128, tokens: int = 2048, seed: int = 0):
    """A weight and inputs living near a low-dimensional subspace, with uneven scales."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, inp, generator=gen) * (torch.rand(inp, generator=gen) * 2 + 0.2)
    x = torch.randn(tokens, 16, generator=gen) @ basis + 0.05 * torch.randn(
        tokens, inp, generator=gen
    )
    w = torch.randn(out, inp, generator=gen) / inp**0.5
    return w, x, 2 * x.T @ x / tokens


def _error(w: torch.Tensor, q: QWeight, x: torch.Tensor) -> float:
    return float((x @ w.T - x @ q.dequantize().T).norm())


def _assert_same(a: QWeight, b: QWeight) -> None:
    assert torch.equal(a.codes(), b.codes())
    assert a.scale.dtype == b.scale.dtype and torch.equal(a.scale, b.scale)
    assert (a.zero is None) == (b.zero is None)
    assert a.zero is None or torch.equal(a.zero, b.zero)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_identity_hessian_gives_round_to_nearest_exactly(scheme):
    w, _, _ = _correlated(seed=1)
    _assert_same(gptq_quantize(w, torch.eye(128), scheme), QWeight.from_float(w, scheme))


def test_act_order_with_a_diagonal_hessian_is_round_to_nearest_unpermuted():
    # a diagonal Hessian propagates no error, and distinct entries give a real permutation
    w, _, _ = _correlated(seed=2)
    hessian = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(3)) + 0.5)
    scheme = QScheme(4, False, PerGroup(32))
    q = gptq_quantize(w, hessian, scheme, act_order=True)
    _assert_same(q, QWeight.from_float(w, scheme))


@pytest.mark.parametrize("scheme", SCHEMES[:3], ids=lambda s: s.describe())
def test_output_error_is_well_below_round_to_nearest_on_correlated_inputs(scheme):
    w, x, hessian = _correlated()
    rtn = _error(w, QWeight.from_float(w, scheme), x)
    for act_order in (False, True):
        gptq = _error(w, gptq_quantize(w, hessian, scheme, act_order=act_order), x)
        assert gptq < 0.6 * rtn, (act_order, gptq / rtn)


def test_result_is_a_valid_qweight_and_the_inputs_are_unchanged():
    w, x, hessian = _correlated()
    w0, h0 = w.clone(), hessian.clone()
    scheme = QScheme(4, True, PerGroup(32))
    q = gptq_quantize(w, hessian, scheme, block_size=48)
    assert torch.equal(w, w0) and torch.equal(hessian, h0)
    assert q.data.dtype == torch.uint8 and q.data.numel() == 48 * 128 // 2
    assert q.scale.shape == (48, 4) and q.scale.dtype == torch.float16 and q.zero is None
    assert int(q.codes().max()) <= 15
    layer = QuantLinear(128, 48, False, scheme)
    layer._store(q)
    assert torch.equal(layer(x[:5]), x[:5] @ q.dequantize().T)


def test_block_size_only_changes_float_rounding():
    w, x, hessian = _correlated()
    scheme = QScheme(3, True, PerGroup(16))
    errors = [_error(w, gptq_quantize(w, hessian, scheme, block_size=b), x) for b in (7, 32, 128)]
    assert max(errors) - min(errors) < 1e-3 * min(errors)


def test_dead_inputs_get_zero_weights():
    w, _, hessian = _correlated()
    hessian[:, 5] = 0
    hessian[5, :] = 0
    scheme = QScheme(4, False, PerGroup(32))
    assert torch.all(gptq_quantize(w, hessian, scheme).dequantize()[:, 5] == 0)


def test_a_hessian_that_is_not_positive_definite_raises_linalg_error():
    w, _, _ = _correlated()
    with pytest.raises(torch.linalg.LinAlgError):
        gptq_quantize(w, -torch.eye(128), QScheme(4, True, PerGroup(32)))


@pytest.mark.parametrize(
    "weight, hessian, scheme, match",
    [
        (torch.ones(4, 32), torch.eye(16), QScheme(4), "square Hessian"),
        (torch.ones(4, 48), torch.eye(48), QScheme(4, True, PerGroup(32)), "does not divide"),
        (torch.ones(4, 32), torch.eye(32) * float("nan"), QScheme(4), "NaN or Inf"),
        (torch.ones(4, 32), torch.eye(32), QScheme(4, True, PerChannel(1)), "per-row scales"),
    ],
)
def test_bad_arguments_are_clear_errors(weight, hessian, scheme, match):
    with pytest.raises(CompactMLError, match=match):
        gptq_quantize(weight, hessian, scheme)


class _Stats(HessianStats):
    """Statistics with a given Hessian (to exercise the damping retries)."""

    def __init__(self, hessian: torch.Tensor) -> None:
        super().__init__(len(hessian))
        self.sum, self.tokens = hessian / 2, 1


def test_damping_is_raised_until_the_factorization_succeeds():
    w, _, _ = _correlated()
    hessian = torch.eye(128)
    hessian[3, 3] = -0.05  # damp 0.01 leaves it negative, 0.1 makes it positive
    with pytest.warns(UserWarning, match=r"Hessian of blocks.1.fc is not positive .*damp=0.1\b"):
        q = GPTQ().quantize_layer("blocks.1.fc", w, _Stats(hessian))
    assert torch.isfinite(q.dequantize()).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CompactMLError, match="not positive definite even with damp=10$"):
            GPTQ().quantize_layer("fc", w, _Stats(-torch.eye(128)))
    retries = [str(c.message).rpartition("retrying with ")[2] for c in caught]
    assert retries == ["damp=0.1", "damp=1", "damp=10"]


# ---------------------------------------------------------------- the config, end to end


def _net_task(batches: int = 4, width: int = 32) -> Task:
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(6, width, generator=gen) * 2
    data = []
    for _ in range(batches):
        x = torch.randn(8, 12, 6, generator=gen) @ basis + 0.1 * torch.randn(
            8, 12, width, generator=gen
        )
        data.append({"x": x, "side": torch.randn(8, 12, width, generator=gen)})
    return Task(calib=data)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _output_error(model: nn.Module, other: nn.Module, task: Task) -> float:
    with torch.no_grad():
        return sum(float((model(**b) - other(**b)).norm()) for b in task.batches("calib"))


def test_gptq_quantizes_every_linear_and_beats_round_to_nearest():
    torch.manual_seed(0)
    model, task = Net().eval(), _net_task()
    before = _snapshot(model)
    quantized = quantize(model, GPTQ(bits=3, group_size=16, progress=False), task)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    names = [n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)]
    assert names == [
        "blocks.0.fc1",
        "blocks.0.fc2",
        "blocks.1.fc1",
        "blocks.1.fc2",
        "side_fc",
        "head",
    ]
    assert quantized.head.scheme == QScheme(3, True, PerGroup(16))
    rtn = quantize(model, WeightOnly(bits=3, group_size=16))
    assert _output_error(model, quantized, task) < 0.8 * _output_error(model, rtn, task)
    (entry,) = history(quantized)
    assert entry["technique"] == "GPTQ" and entry["skipped"] == {}
    assert entry["gptq"] == {"blocks": ["blocks.0", "blocks.1"], "calib_batches": 4}


def test_gptq_model_saves_and_loads_bit_exactly(factory, tmp_path):
    model = factory("wide")  # a Sequential of Linear layers: one block, the whole model
    task = Task(calib=[torch.randn(16, 256) for _ in range(2)])
    quantized = quantize(model, GPTQ(bits=4, group_size=32, act_order=True, progress=False), task)
    loaded = load(save(quantized, tmp_path / "g.cml"), trust_factory=True)
    x = torch.randn(3, 256)
    assert torch.equal(loaded(x), quantized(x))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in quantized.modules()]


def test_gptq_model_exports_to_onnx_matmul_nbits(tmp_path):
    onnx = pytest.importorskip("onnx")
    from compactml.export import ort
    from compactml.export.onnx import export

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    task = Task(calib=[torch.randn(16, 64) for _ in range(2)])
    quantized = GPTQ(bits=4, group_size=32, progress=False).apply(model, task)
    x = torch.randn(3, 64)
    path = export(quantized, tmp_path / "g.onnx", x)
    assert "MatMulNBits" in {n.op_type for n in onnx.load(path).graph.node}
    got = ort.run(ort.session(path, threads=1), x)[0]
    assert abs(got - quantized(x).detach().numpy()).max() < 1e-5


def test_a_bare_linear_model_is_replaced():
    layer = nn.Linear(32, 8)
    quantized = GPTQ(progress=False, group_size=32).apply(layer, Task(calib=[torch.randn(5, 32)]))
    assert isinstance(quantized, QuantLinear) and type(layer) is nn.Linear


def test_a_nan_batch_leaves_only_the_layer_it_reaches_in_float():
    torch.manual_seed(0)
    model, task = Net().eval(), _net_task()
    data = list(task.calib)
    data[1] = dict(data[1], side=torch.full_like(data[1]["side"], float("nan")))
    with pytest.warns(UserWarning, match=r"kept 1 layer\(s\) in float: side_fc: .*NaN or Inf"):
        quantized = GPTQ(bits=4, group_size=32, progress=False).apply(model, Task(calib=data))
    assert type(quantized.side_fc) is nn.Linear
    assert isinstance(quantized.head, QuantLinear) and isinstance(
        quantized.blocks[1].fc2, QuantLinear
    )
    assert all(
        torch.isfinite(v).all() for v in quantized.state_dict().values() if v.is_floating_point()
    )
    assert all(
        torch.isfinite(m.weight).all() for m in quantized.modules() if isinstance(m, QuantLinear)
    )
    assert "side_fc" in history(quantized)[0]["skipped"]


def test_a_layer_that_never_runs_stays_float_and_is_named():
    model, task = Net().eval(), _net_task()
    data = [{"x": b["x"]} for b in task.calib]  # side_fc never runs
    with pytest.warns(UserWarning, match="side_fc: it never received input"):
        quantized = GPTQ(group_size=32, progress=False).apply(model, Task(calib=data))
    assert type(quantized.side_fc) is nn.Linear and isinstance(quantized.head, QuantLinear)


def test_group_size_that_does_not_divide_some_layers_keeps_them_float():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
    task = Task(calib=[torch.randn(8, 64)])
    with pytest.warns(UserWarning, match="2: group size 32 does not divide the row length 48"):
        quantized = GPTQ(group_size=32, progress=False).apply(model, task)
    assert isinstance(quantized[0], QuantLinear) and type(quantized[2]) is nn.Linear


def test_a_model_without_linear_layers_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(CompactMLError, match=r"has no nn.Linear layer; .*use WeightOnly"):
        GPTQ(progress=False).apply(model, Task(calib=[torch.randn(2, 1, 8, 8)]))


@pytest.mark.parametrize(
    "config, task, match",
    [
        (GPTQ(), None, "needs calibration data"),
        (GPTQ(), Task(calib=[]), "calib data is empty"),
        (GPTQ(include=("nothing*",)), "ok", "found no Linear layer selected"),
        (GPTQ(group_size=256), "ok", "group size 256 does not divide"),
        (GPTQ(group_size=32), Task(calib=[{"x": torch.randn(2, 5, 7)}]), r"x: tensor\(2, 5, 7\)"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_model_is_untouched(config, task, match):
    model = Net().eval()
    before = _snapshot(model)
    task = _net_task(1) if task == "ok" else task
    with pytest.raises(CompactMLError, match=match):
        quantize(model, config.__class__(**(config.params() | {"progress": False})), task)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 9}, "bits=9"),
        ({"group_size": 48}, "group_size=48"),
        ({"damp": 0}, "damp must be"),
        ({"damp": "0.1"}, "damp must be"),
        ({"block_size": 0}, "block_size must be"),
        ({"calib_batches": 0}, "calib_batches must be"),
        ({"act_order": 1}, "act_order must be"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(CompactMLError, match=match):
        GPTQ(**kwargs)
