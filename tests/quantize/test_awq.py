"""AWQ: the scale search as a pure function, and the AWQ config end to end."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from compactml.config import history
from compactml.errors import CompactMLError
from compactml.export.artifact import load, save
from compactml.quantize import QuantLinear, WeightOnly, affine
from compactml.quantize.affine import PerChannel, PerGroup, QScheme, choose_qparams, fake_quantize
from compactml.quantize.awq import AWQ, TokenSample, awq_search, quantized_with_scales
from compactml.quantize.clip import mse_clip
from compactml.quantize.fold import ScaledInput, linear_name
from compactml.source import load_factory
from compactml.task import Task

SCHEME = QScheme(bits=3, granularity=PerGroup(32))


def _salient_layer(seed: int = 0):
    """Inputs where a few channels are 30x larger than the rest (as in LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=gen)
    x[:, :4] *= 30
    w = torch.randn(64, 128, generator=gen)
    return w, x


def test_alpha_zero_is_round_to_nearest():
    w, _ = _salient_layer()
    scale, zero = choose_qparams(w, SCHEME)
    ones = torch.ones(128)
    quantized, qscale, qzero = quantized_with_scales(w, ones, SCHEME)
    assert torch.allclose(quantized, fake_quantize(w, scale, zero, SCHEME))
    assert torch.equal(qscale, scale) and qzero is None


def test_scales_protect_salient_channels_and_beat_rtn():
    w, x = _salient_layer()
    found = awq_search(w, x, SCHEME)
    assert found.alpha > 0
    assert found.error < 0.8 * found.rtn
    assert float(found.scales[:4].min()) > float(found.scales[4:].max())
    exact = (x / found.scales) @ (w * found.scales.reshape(1, -1)).T  # folding is exact in float
    assert torch.allclose(exact, x @ w.T, rtol=1e-4, atol=1e-3)


def test_uniform_inputs_need_no_scaling():
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(16, 64, generator=gen), torch.randn(512, 64, generator=gen)
    found = awq_search(w, x, SCHEME)
    assert found.error <= found.rtn


def test_scales_too_large_for_float16_are_not_candidates():
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(8, 32, generator=gen) * 1000, torch.rand(64, 32, generator=gen) * 1e-3
    x[:, 0] = 1e6  # large alphas push column 0 of the weight past float16 scales
    found = awq_search(w, x, SCHEME)
    assert torch.isfinite(found.scales).all() and found.error <= found.rtn
    scale, _ = choose_qparams(w * found.scales.reshape(1, -1), SCHEME)
    assert float(scale.max()) <= 65504
    largest = x.abs().mean(0) ** 0.95  # the last alpha tried
    largest = largest / (largest.max() * largest.min()).sqrt()
    with pytest.raises(CompactMLError, match="float16 scales"):
        choose_qparams(w * largest.reshape(1, -1), SCHEME)


def _outlier_layer(seed: int = 3):
    """A layer with a few outlier weights (reading ordinary inputs) that stretch their groups'
    ranges, and inputs with a few loud channels."""
    w, x = _salient_layer(seed)
    w[::4, 40] = 12.0
    return w, x


def _output_error(w, x, found, scheme=SCHEME):
    """The relative output error of the layer quantized as ``found`` says, computed directly."""
    s = found.scales.reshape(1, -1)
    q = fake_quantize(w * s, found.qscale, found.qzero, scheme) / s
    return float((x @ (q - w).T).pow(2).sum() / (x @ w.T).pow(2).sum())


@pytest.mark.parametrize(
    "scheme, bound",
    [
        (SCHEME, 0.75),
        (QScheme(4, False, PerGroup(32)), 0.96),  # the zero point already absorbs some of it
        (QScheme(4, True, PerChannel(0)), 0.8),
    ],
    ids=str,
)
def test_clipping_lowers_the_output_error_of_a_layer_with_outlier_weights(scheme, bound):
    w, x = _outlier_layer()
    plain, clipped = awq_search(w, x, scheme, clip=False), awq_search(w, x, scheme)
    assert clipped.alpha == plain.alpha and torch.equal(clipped.scales, plain.scales)
    assert clipped.error < bound * plain.error and clipped.rtn == plain.rtn
    assert _output_error(w, x, plain, scheme) == pytest.approx(plain.error, rel=1e-3)
    assert _output_error(w, x, clipped, scheme) == pytest.approx(clipped.error, rel=1e-3)
    unclipped, _ = choose_qparams(w * plain.scales.reshape(1, -1), scheme)
    assert torch.equal(plain.qscale, unclipped)
    assert (clipped.qscale <= unclipped).all() and (clipped.qscale < unclipped).any()


def _block_output_errors(w, x, scale, zero, scheme):
    d = affine.dequantize(affine.quantize(w, scale, zero, scheme), scale, zero, scheme) - w
    return (x @ d.T).pow(2).sum(dim=0)  # one row, one block per row: per block


def test_output_clipping_weighs_each_weight_by_its_input():
    gen = torch.Generator().manual_seed(4)
    scheme = QScheme(4, True, PerGroup(32))
    w = torch.randn(16, 32, generator=gen)
    w[:, 0] = 8.0  # every row's range is set by the weight of column 0
    x = torch.randn(1024, 32, generator=gen)
    assert torch.equal(
        mse_clip(w, scheme, 20, gram=torch.eye(32)[None])[0], mse_clip(w, scheme, 20)[0]
    )
    plain = mse_clip(w, scheme, 20)
    scales = {}
    for name, loudness in (("loud", 20.0), ("quiet", 0.01)):
        xi = x.clone()
        xi[:, 0] *= loudness
        found = mse_clip(w, scheme, 20, gram=(xi.T @ xi)[None])
        scales[name] = found[0]
        assert (
            _block_output_errors(w, xi, *found, scheme)
            <= _block_output_errors(w, xi, *plain, scheme) * (1 + 1e-5)
        ).all()
    # a weight reading a loud input keeps its range; one reading a quiet input is clipped hard
    assert (scales["quiet"] <= plain[0]).all() and (plain[0] <= scales["loud"]).all()
    assert (
        float(scales["quiet"].sum())
        < 0.8 * float(plain[0].sum())
        < 0.8 * float(scales["loud"].sum())
    )
    with pytest.raises(
        CompactMLError, match=r"must be \(column blocks, size, size\) \(1, 32, 32\)"
    ):
        mse_clip(w, scheme, gram=torch.eye(16)[None])


def test_clipping_never_writes_nan_on_zero_weights_and_silent_inputs():
    w, x = _outlier_layer()
    w[:8] = 0.0  # all-zero rows: zero-width ranges
    x[:, 64:96] = 0.0  # a group of columns that never sees input: a zero Gram block
    found = awq_search(w, x, SCHEME)
    assert torch.isfinite(found.scales).all() and torch.isfinite(found.qscale).all()
    s = found.scales.reshape(1, -1)
    q = fake_quantize(w * s, found.qscale, found.qzero, SCHEME) / s
    assert torch.isfinite(q).all() and (q[:8] == 0).all()
    assert found.error <= found.rtn


def test_bad_shapes_are_refused():
    with pytest.raises(CompactMLError, match="tokens, in"):
        awq_search(torch.randn(4, 8), torch.randn(10, 9), SCHEME)


# --- the AWQ config --------------------------------------------------------------------------

LLAMA = textwrap.dedent(
    """
    import torch
    from compactml.examples import tiny_llama as tl

    def build():
        recipe = tl.Recipe(vocab_size=64, hidden_size=64, intermediate_size=128, layers=2,
                           heads=2, context=32)
        model = tl.new_model(recipe).eval()
        with torch.no_grad():  # outlier channels, as trained LLM norms make them
            for layer in model.lm.model.layers:
                layer.input_layernorm.weight[:4] = 20.0
                layer.post_attention_layernorm.weight[2:5] = 15.0
        return model
    """
)


@pytest.fixture
def llama(tmp_path):
    """A 2-block, 64-wide tiny-llama with outlier input channels, from a factory file."""
    pytest.importorskip("transformers")
    path = tmp_path / "awq_llama.py"
    path.write_text(LLAMA)
    return load_factory(f"{path}:build")[0]


def _token_task(batches: int = 3) -> Task:
    gen = torch.Generator().manual_seed(0)
    return Task(
        calib=[{"input_ids": torch.randint(1, 64, (4, 16), generator=gen)} for _ in range(batches)]
    )


def _error(model: nn.Module, other: nn.Module, task: Task) -> float:
    with torch.no_grad():
        total = 0.0
        for batch in task.batches("calib"):
            a, b = model(**batch), other(**batch)
            total += float((a - b).norm() / a.norm())
    return total


def test_awq_beats_round_to_nearest_on_a_llama_with_outlier_channels(llama):
    task = _token_task()
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    quantized = AWQ(bits=3, group_size=32, progress=False).apply(llama, task)
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    rtn = WeightOnly(bits=3, group_size=32, exclude=("*embed*",)).apply(llama)
    assert _error(llama, quantized, task) < 0.85 * _error(llama, rtn, task)
    linears = [n for n, m in llama.named_modules() if type(m) is nn.Linear]
    (entry,) = history(quantized)
    assert sorted(entry["changed"]) == sorted(linears) and entry["skipped"] == {}
    groups = entry["awq"]["groups"]
    assert [g["kind"] for g in groups] == ["norm", "explicit", "norm", "explicit"] * 2 + [
        "explicit"
    ]
    assert all(g["error"] <= g["rtn"] for g in groups)
    assert all(g["alpha"] > 0 for g in groups if g["kind"] == "norm")  # the outliers matter
    quantized_names = {n for n, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    assert quantized_names == {linear_name(quantized, n) for n in linears}


def test_awq_model_saves_and_loads_bit_exactly(llama, tmp_path):
    task = _token_task(2)
    quantized = AWQ(bits=4, group_size=32, progress=False).apply(llama, task)
    loaded = load(save(quantized, tmp_path / "awq.cml"), trust_factory=True)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in quantized.modules()]
    ids = task.calib[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids), quantized(ids))
    plain = AWQ(bits=4, group_size=32, clip=False, progress=False).apply(llama, task)
    assert _error(llama, quantized, task) < _error(llama, plain, task)  # the clipping is there


def test_awq_model_exports_to_onnx_matmul_nbits(llama, tmp_path):
    onnx = pytest.importorskip("onnx")
    from compactml.export import ort
    from compactml.export.onnx import export

    task = _token_task(2)
    quantized = AWQ(bits=4, group_size=32, progress=False).apply(llama, task)
    ids = task.calib[0]["input_ids"]
    path = export(quantized, tmp_path / "awq.onnx", ids)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("MatMulNBits") == 15  # 7 per block and the head
    got = ort.run(ort.session(path, threads=1), ids)[0]
    with torch.no_grad():
        assert abs(got - quantized(ids).numpy()).max() < 1e-4


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class _Net(nn.Module):
    """Two pre-norm MLP blocks, a side input through its own Linear, and a head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width) for _ in range(2))
        self.side_fc, self.head = nn.Linear(width, width), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x if side is None else x + self.side_fc(side))


def _net_task(batches: int = 3, side: bool = True) -> Task:
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batches):
        x = torch.randn(4, 6, 32, generator=gen)
        x[..., :3] *= 25
        data.append({"x": x} | ({"side": torch.randn(4, 6, 32, generator=gen)} if side else {}))
    return Task(calib=data)


def test_a_nan_batch_leaves_the_layers_it_reaches_in_float():
    torch.manual_seed(0)
    model, data = _Net().eval(), list(_net_task().calib)
    data[1] = dict(data[1], side=torch.full_like(data[1]["side"], float("nan")))
    with pytest.warns(UserWarning, match=r"kept 2 layer\(s\) in float: side_fc: .*NaN.*; head:"):
        quantized = AWQ(group_size=32, progress=False).apply(model, Task(calib=data))
    assert type(quantized.side_fc) is nn.Linear and type(quantized.head) is nn.Linear
    for name in ("blocks.0.fc1", "blocks.1.fc2"):
        assert isinstance(quantized.get_submodule(linear_name(quantized, name)), QuantLinear)
    assert all(
        torch.isfinite(v).all() for v in quantized.state_dict().values() if v.is_floating_point()
    )
    assert set(history(quantized)[0]["skipped"]) == {"side_fc", "head"}


def test_a_layer_that_never_runs_stays_float_and_is_named():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="side_fc: it never received input"):
        quantized = AWQ(group_size=32, progress=False).apply(_Net().eval(), _net_task(side=False))
    assert type(quantized.side_fc) is nn.Linear
    assert history(quantized)[0]["awq"]["groups"][0]["kind"] == "norm"  # blocks.0.fc1


def test_group_size_that_does_not_divide_some_layers_keeps_them_float():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))
    task = Task(calib=[torch.randn(8, 64)])
    with pytest.warns(UserWarning, match="2: group size 32 does not divide the row length 48"):
        quantized = AWQ(group_size=32, progress=False).apply(model, task)
    assert isinstance(quantized.get_submodule(linear_name(quantized, "0")), QuantLinear)
    assert type(quantized[2]) is nn.Linear


def test_a_bare_linear_model_gets_an_explicit_scale():
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 8), torch.randn(64, 64)
    x[:, :2] *= 40
    quantized = AWQ(bits=3, group_size=32, progress=False).apply(layer, Task(calib=[x]))
    assert isinstance(quantized, ScaledInput) and isinstance(quantized.inner, QuantLinear)
    assert history(quantized)[0]["awq"]["groups"][0]["alpha"] > 0
    rtn = WeightOnly(bits=3, group_size=32).apply(layer)
    with torch.no_grad():
        assert float((quantized(x) - layer(x)).norm()) < float((rtn(x) - layer(x)).norm())


@pytest.mark.parametrize(
    "config, task, match",
    [
        (AWQ(), None, "needs calibration data"),
        (AWQ(), Task(calib=[]), "calib data is empty"),
        (AWQ(include=("nothing*",)), "ok", "found no Linear layer selected"),
        (AWQ(group_size=256), "ok", "group size 256 does not divide"),
        (AWQ(group_size=32), Task(calib=[{"x": torch.randn(2, 5, 7)}]), r"x: tensor\(2, 5, 7\)"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_model_is_untouched(config, task, match):
    model = _Net().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = _net_task(1) if task == "ok" else task
    with pytest.raises(CompactMLError, match=match):
        AWQ(**(config.params() | {"progress": False})).apply(model, task)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 9}, "bits=9"),
        ({"group_size": 48}, "group_size=48"),
        ({"grid": 0}, "grid must be"),
        ({"calib_batches": 0}, "calib_batches must be"),
        ({"symmetric": 1}, "symmetric must be"),
        ({"clip": "output"}, "clip must be true or false"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(CompactMLError, match=match):
        AWQ(**kwargs)


def test_token_sample_is_bounded_uniform_and_reproducible():
    def fill(seed: int) -> TokenSample:
        sample = TokenSample(4, limit=100, seed=seed)
        for i in range(10):  # token t holds the value t in every channel
            sample.add(torch.arange(100 * i, 100 * (i + 1)).float().reshape(100, 1).expand(100, 4))
        return sample

    a, b = fill(0), fill(0)
    assert a.sample().shape == (100, 4) and torch.equal(a.sample(), b.sample())
    kept = a.sample()[:, 0]
    assert len(kept.unique()) == 100 and 300 < float(kept.mean()) < 700  # drawn from all 1000
    assert torch.allclose(a.mean_abs(), torch.full((4,), 499.5))  # over every token
    assert not torch.equal(fill(1).sample(), a.sample())
