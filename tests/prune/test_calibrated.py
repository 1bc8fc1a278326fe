"""SparseGPT and Wanda as prune configs, calibrated block by block."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from torch import nn

import compactml as cml
from compactml.calib.stats import HessianStats
from compactml.config import history
from compactml.errors import CompactMLError
from compactml.prune import NM, Magnitude, SparseGPT, Wanda, prune, sparsity
from compactml.prune.sparsegpt import wanda_prune
from compactml.source import load_factory
from compactml.task import Task, primary_output, split_batch
from compactml.techniques import technique_from_dict, technique_name

from ..calib.conftest import MLPNet as Net
from ..calib.conftest import tiny_bert, tiny_llama, token_task

PATTERNS = [{"sparsity": 0.5}, {"n": 2, "m": 4}]
PATTERN_IDS = ["50%", "2:4"]


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def _outlier_task(batches: int = 4, width: int = 32, seed: int = 0) -> Task:
    """Inputs near an 8-dimensional subspace whose channels 3, 9, 17 and 26 are 20x larger
    than the rest (the activation outliers of language models; one per group of 4, so N:M
    can keep them); the residual stream carries them through every block."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, width, generator=gen)
    scale = torch.ones(width)
    scale[[3, 9, 17, 26]] = 20.0
    data = []
    for _ in range(batches):
        x = torch.randn(16, 8, generator=gen) @ basis + 0.3 * torch.randn(16, width, generator=gen)
        data.append({"x": x * scale, "side": torch.randn(16, width, generator=gen)})
    return Task(calib=data)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == before.keys() and all(
        torch.equal(v, before[k]) for k, v in state.items()
    )


def _error(model: nn.Module, other: nn.Module, task: Task) -> float:
    """Relative squared output error over the calibration batches."""
    total = 0.0
    with torch.no_grad():
        for batch in task.batches("calib"):
            inputs = split_batch(batch)[0]
            a, b = primary_output(model(**inputs)), primary_output(other(**inputs))
            total += float((a - b).square().sum() / a.square().sum())
    return total


@pytest.mark.parametrize("pattern", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("method", [SparseGPT, Wanda])
@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_every_linear_of_a_transformer_is_pruned_exactly(build, method, pattern):
    model = build()
    before = _snapshot(model)
    pruned = prune(model, method(progress=False, **pattern), token_task(padded=True))
    assert _unchanged(model, before)
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    (entry,) = history(pruned)
    assert entry["changed"] == linears and entry["skipped"] == {}
    assert len(entry["calibration"]["blocks"]) == 2
    measured = sparsity(pruned).layers
    for name in linears:
        layer, original = pruned.get_submodule(name), before[f"{name}.weight"]
        keep = layer.weight_mask
        assert torch.isfinite(layer.weight).all()
        assert torch.equal(layer.weight == 0, ~keep)
        assert measured[name] == 0.5 and entry["sparsity"][name] == 0.5
        if "n" in pattern:  # 2 kept in every group of 4 consecutive inputs of a row
            groups = keep.reshape(keep.shape[0], -1, 4).sum(-1)
            assert torch.equal(groups, torch.full_like(groups, 2))
        if method is Wanda:  # 50% of every row, the kept weights as they were
            assert torch.equal(keep.sum(1), torch.full((keep.shape[0],), keep.shape[1] // 2))
            assert torch.equal(layer.weight[keep], original[keep])
        else:  # SparseGPT updates the weights it keeps
            assert not torch.equal(layer.weight[keep], original[keep])
    linear_weights = {f"{name}.weight" for name in linears} | {f"{n}.weight_mask" for n in linears}
    for key, value in pruned.state_dict().items():  # embeddings and norms are left alone
        if key not in linear_weights:
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("pattern", PATTERNS, ids=PATTERN_IDS)
def test_calibrated_pruning_beats_magnitude_on_outlier_channels(pattern):
    model, task = _net(), _outlier_task()
    baseline = Magnitude(sparsity=0.5) if "sparsity" in pattern else NM(n=2, m=4)
    magnitude = _error(model, prune(model, baseline), task)
    sparsegpt = _error(model, prune(model, SparseGPT(progress=False, **pattern), task), task)
    wanda = _error(model, prune(model, Wanda(progress=False, **pattern), task), task)
    # measured: SparseGPT about 0.04x magnitude's error, Wanda 0.15-0.18x
    assert sparsegpt < 0.2 * magnitude
    assert wanda < 0.5 * magnitude
    assert sparsegpt < wanda


def test_each_block_is_calibrated_on_the_output_of_the_pruned_blocks_before_it():
    model, task = _net(), _outlier_task()
    pruned = prune(model, Wanda(progress=False), task)
    xs = [batch["x"] for batch in task.batches("calib")]
    with torch.no_grad():
        after_pruned = torch.cat([pruned.blocks[0](x) for x in xs])
        after_dense = torch.cat([model.blocks[0](x) for x in xs])
    weight = model.blocks[1].fc1.weight
    _, expected = wanda_prune(weight, after_pruned.norm(dim=0), sparsity=0.5)
    _, dense = wanda_prune(weight, after_dense.norm(dim=0), sparsity=0.5)
    assert not torch.equal(expected, dense)  # the test can tell the two apart
    assert torch.equal(pruned.blocks[1].fc1.weight_mask, expected)


@pytest.mark.parametrize("method", [SparseGPT, Wanda])
def test_a_layer_that_never_runs_is_left_alone_and_named(method):
    model = _net()
    task = Task(calib=[{"x": b["x"]} for b in _outlier_task().batches("calib")])
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) unpruned: side_fc: it never received"):
        pruned = prune(model, method(progress=False), task)
    assert torch.equal(pruned.side_fc.weight, model.side_fc.weight)
    assert "weight_mask" not in dict(pruned.side_fc.named_buffers())
    assert sparsity(pruned).layers["head"] == 0.5
    assert "side_fc" in history(pruned)[0]["skipped"]


@pytest.mark.parametrize("method", [SparseGPT, Wanda])
def test_a_nan_batch_leaves_only_the_layer_it_reaches_unpruned(method):
    model = _net()
    data = list(_outlier_task().batches("calib"))
    data[1] = dict(data[1], side=torch.full_like(data[1]["side"], float("nan")))
    with pytest.warns(UserWarning, match=r"side_fc: its calibration inputs contain NaN or Inf"):
        pruned = prune(model, method(progress=False), Task(calib=data))
    assert torch.equal(pruned.side_fc.weight, model.side_fc.weight)
    assert all(torch.isfinite(v).all() for v in pruned.state_dict().values())
    (entry,) = history(pruned)
    assert set(entry["changed"]) == {"blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1"} | {
        "blocks.1.fc2",
        "head",
    }


def test_layers_m_does_not_divide_and_non_finite_weights_are_skipped_and_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 36), nn.ReLU(), nn.Linear(36, 16), nn.Linear(16, 4))
    with torch.no_grad():
        model[3].weight[0, 0] = float("inf")
    task = Task(calib=[torch.randn(8, 32) for _ in range(2)])
    with pytest.warns(UserWarning) as caught:
        pruned = prune(model, SparseGPT(n=2, m=8, progress=False), task)
    (message,) = [str(w.message) for w in caught]
    assert "2: input width 36 is not divisible by m=8" in message
    assert "3: the weight has NaN or Inf values" in message
    assert history(pruned)[0]["changed"] == ["0"]
    assert torch.equal(pruned[2].weight, model[2].weight)
    assert torch.equal(pruned[3].weight, model[3].weight)  # the user's inf, not a new one
    with pytest.raises(CompactMLError, match=r"no selected layer can be pruned \(0: input width"):
        prune(model, Wanda(n=1, m=5, progress=False), task)


class _Stats(HessianStats):
    """Statistics with a given Hessian (to exercise the damping retries)."""

    def __init__(self, hessian: torch.Tensor) -> None:
        super().__init__(len(hessian))
        self.sum, self.tokens = hessian / 2, 1


def test_sparsegpt_raises_the_damping_until_the_factorization_succeeds():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    hessian = torch.eye(32)
    hessian[3, 3] = -0.05  # damp 0.01 leaves it negative, 0.1 makes it positive
    pattern = r"SparseGPT: the Hessian of blocks.1.fc is not positive .*retrying with damp=0.1$"
    with pytest.warns(UserWarning, match=pattern):
        new, keep = SparseGPT().prune_layer("blocks.1.fc", weight, _Stats(hessian))
    assert torch.isfinite(new).all() and int(keep.sum()) == weight.numel() // 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CompactMLError, match="not positive definite even with damp=10$"):
            SparseGPT().prune_layer("fc", weight, _Stats(-torch.eye(32)))
    assert len(caught) == 3


FACTORY = textwrap.dedent(
    """
    import torch
    import transformers


    def llama():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        )
        return transformers.LlamaForCausalLM(config).eval()
    """
)


@pytest.mark.parametrize("config", [SparseGPT(progress=False), Wanda(n=2, m=4, progress=False)])
def test_save_and_load_round_trip_is_bit_exact_and_sparse(tmp_path, config):
    path = tmp_path / "llama.py"
    path.write_text(FACTORY)
    model = load_factory(f"{path}:llama")[0]
    task = token_task(padded=True)
    pruned = prune(model, config, task)
    saved = cml.save(pruned, tmp_path / "pruned.cml")
    loaded = cml.load(saved, trust_factory=True)
    state, again = pruned.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys()
    assert all(torch.equal(v, again[k]) and v.dtype == again[k].dtype for k, v in state.items())
    inputs = split_batch(next(task.batches("calib")))[0]
    with torch.no_grad():
        assert torch.equal(primary_output(loaded(**inputs)), primary_output(pruned(**inputs)))
    dense = cml.save(model, tmp_path / "dense.cml")
    assert saved.stat().st_size < 0.8 * dense.stat().st_size  # masks and values, not zeros


@pytest.mark.parametrize(
    "config, task, match",
    [
        (SparseGPT(), None, "needs calibration data"),
        (Wanda(), Task(calib=[]), "calib data is empty"),
        (Wanda(n=2, m=3), "ok", "no selected layer can be pruned"),
        (SparseGPT(include=("nothing*",)), "ok", "found no Linear layer selected"),
        (Wanda(), Task(calib=[{"x": torch.randn(2, 5, 7)}]), r"x: tensor\(2, 5, 7\)"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_model_is_untouched(config, task, match):
    model = _net()
    before = _snapshot(model)
    task = _outlier_task(1) if task == "ok" else task
    with pytest.raises(CompactMLError, match=match):
        prune(model, type(config)(**(config.params() | {"progress": False})), task)
    assert _unchanged(model, before)
    with pytest.raises(CompactMLError, match=r"has no nn.Linear layer; .*Magnitude or NM"):
        prune(nn.Sequential(nn.Conv2d(1, 4, 3)), Wanda(), Task(calib=[torch.randn(2, 1, 8, 8)]))


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (SparseGPT, {"sparsity": 0.5, "n": 2, "m": 4}, "not both"),
        (Wanda, {"sparsity": 0.5, "n": 2, "m": 4}, "not both"),
        (Wanda, {"n": 2}, "needs both n and m"),
        (SparseGPT, {"sparsity": 1.0}, r"\[0, 1\)"),
        (Wanda, {"n": 5, "m": 4}, "greater than m"),
        (Wanda, {"n": 0, "m": 4}, "n must be a positive integer"),
        (SparseGPT, {"n": 2, "m": 4, "block_size": 30}, "not a multiple of m=4"),
        (SparseGPT, {"damp": 0}, "damp must be"),
        (Wanda, {"calib_batches": 0}, "calib_batches must be"),
        (Wanda, {"progress": 1}, "progress must be"),
    ],
)
def test_config_validation(cls, kwargs, match):
    with pytest.raises(CompactMLError, match=match):
        cls(**kwargs)


def test_pattern_defaults_and_recipe_names():
    assert SparseGPT().sparsity == 0.5 and SparseGPT().pattern() == {"sparsity": 0.5}
    nm = Wanda(n=4, m=8)
    assert nm.sparsity is None and nm.pattern() == {"n": 4, "m": 8}
    for config in (SparseGPT(sparsity=0.3, damp=0.1), nm):
        name = technique_name(config)
        assert technique_from_dict(name, config.params()) == config
    assert (technique_name(SparseGPT()), technique_name(nm)) == ("sparsegpt", "wanda")
    assert cml.SparseGPT is SparseGPT and cml.Wanda is Wanda
