"""Input-scale folding: which layers share an input, where their scales fold, and that the float
model computes the same outputs after folding (in PyTorch, after save/load, and in ONNX)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from compactml.calib.capture import run_blockwise
from compactml.errors import CompactMLError
from compactml.export.artifact import load, save
from compactml.quantize.affine import PerChannel, PerGroup, QScheme
from compactml.quantize.fold import (
    InputGroup,
    ScaledInput,
    fold_input_scale,
    input_groups,
    linear_name,
)
from compactml.quantize.modules import QuantLinear
from compactml.source import load_factory
from compactml.task import Task, split_batch

pytest.importorskip("transformers")

LLAMA = textwrap.dedent(
    """
    from compactml.examples import tiny_llama as tl

    def build():
        recipe = tl.Recipe(vocab_size=64, hidden_size=32, intermediate_size=64, layers=2,
                           heads=2, context=32)
        return tl.new_model(recipe).eval()
    """
)


@pytest.fixture
def llama(tmp_path):
    """A 2-block, 32-wide tiny-llama CausalLM built from a factory file (so it can be saved)."""
    path = tmp_path / "llama_factory.py"
    path.write_text(LLAMA)
    return load_factory(f"{path}:build")[0]


def _tokens(batches: int = 2, seed: int = 0) -> Task:
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, 6:] = 0
        data.append(
            {"input_ids": torch.randint(1, 64, (3, 10), generator=gen), "attention_mask": mask}
        )
    return Task(calib=data)


def _bert() -> nn.Module:
    import transformers

    from compactml.examples.hf import SentenceEncoder

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    return SentenceEncoder(transformers.BertModel(config), normalize=False).eval()


def _blockwise_groups(model: nn.Module, task: Task) -> list[InputGroup]:
    """The groups of every block's Linear layers, as a calibration method finds them."""
    groups: list[InputGroup] = []

    def step(block):
        layers = {n: m for n, m in block.named_modules() if type(m) is nn.Linear}
        groups.extend(input_groups(model, layers, block.forward))

    run_blockwise(model, task, step, progress=False)
    return groups


def _outputs(model: nn.Module, task: Task) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**split_batch(b)[0]) for b in task.batches("calib")]


def _fold_random(model: nn.Module, groups: list[InputGroup], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for group in groups:
        width = model.get_submodule(linear_name(model, group.layers[0])).in_features
        fold_input_scale(model, group, torch.rand(width, generator=gen) * 8 + 0.1)


def test_llama_blocks_fold_into_their_norms(llama):
    groups = _blockwise_groups(llama, _tokens())
    prefix = "lm.model.layers.0."
    assert groups[:4] == [
        InputGroup(
            tuple(f"{prefix}self_attn.{p}_proj" for p in "qkv"), f"{prefix}input_layernorm", "norm"
        ),
        InputGroup((f"{prefix}self_attn.o_proj",), None, "explicit"),
        InputGroup(
            (f"{prefix}mlp.gate_proj", f"{prefix}mlp.up_proj"),
            f"{prefix}post_attention_layernorm",
            "norm",
        ),
        InputGroup((f"{prefix}mlp.down_proj",), None, "explicit"),
    ]
    assert [g.kind for g in groups[4:8]] == ["norm", "explicit", "norm", "explicit"]
    # lm_head reads a slice of the final norm's output, not the output itself
    assert groups[8:] == [InputGroup(("lm.lm_head",), None, "explicit")]


def test_bert_layers_are_all_explicit():
    # post-norm: every LayerNorm output also feeds the next residual add
    model, task = _bert(), _tokens()
    groups = _blockwise_groups(model, task)
    assert {g.kind for g in groups} == {"explicit"}
    qkv = tuple(f"encoder.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value"))
    assert groups[0].layers == qkv
    assert sum(len(g.layers) for g in groups) == sum(type(m) is nn.Linear for m in model.modules())


@pytest.mark.parametrize("build", ["llama", "bert"])
def test_folding_random_scales_keeps_the_float_outputs(build, request):
    model = request.getfixturevalue("llama") if build == "llama" else _bert()
    task = _tokens()
    before = _outputs(model, task)
    groups = _blockwise_groups(model, task)
    _fold_random(model, groups)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ScaledInput)]
    assert wrapped == [n for g in groups if g.kind == "explicit" for n in g.layers]
    for a, b in zip(before, _outputs(model, task), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_folding_twice_updates_the_wrapper():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(5, 8)
    want = model(x)
    group = InputGroup(("2",), None, "explicit")
    fold_input_scale(model, group, torch.full((8,), 2.0))
    fold_input_scale(model, group, torch.arange(1.0, 9.0))
    assert isinstance(model[2], ScaledInput) and type(model[2].inner) is nn.Linear
    assert torch.allclose(model[2].inv_scale, 0.5 / torch.arange(1.0, 9.0))
    assert torch.allclose(model(x), want, atol=1e-6)


class _Mixed(nn.Module):
    """fc1 feeds fc2 and fc3 only; a LayerNorm feeds fc4 only; a norm computing x * (1 + w)
    (named like an RMSNorm) feeds fc5; a LayerNorm feeding fc6 is also added to the residual."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.norm, self.fc4 = nn.LayerNorm(8), nn.Linear(8, 8)
        self.gemma, self.fc5 = GemmaRMSNorm(8), nn.Linear(8, 8)
        self.post, self.fc6 = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        x = x + self.fc2(h) * self.fc3(h)
        x = x + self.fc4(self.norm(x))
        x = x + self.fc5(self.gemma(x))
        p = self.post(x)
        return p + self.fc6(p)


class GemmaRMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def _mixed_groups(model: nn.Module, names: list[str], x: torch.Tensor) -> list[InputGroup]:
    layers = {n: model.get_submodule(n) for n in names}
    return input_groups(model, layers, lambda: model(x))


def test_linear_and_norm_producers_fold_only_when_safe():
    torch.manual_seed(0)
    model, x = _Mixed().eval(), torch.randn(2, 5, 8)
    nn.init.normal_(model.norm.weight)
    nn.init.normal_(model.norm.bias)
    want = model(x)
    groups = _mixed_groups(model, ["fc2", "fc3", "fc4", "fc5", "fc6"], x)
    assert groups == [
        InputGroup(("fc2", "fc3"), "fc1", "linear"),
        InputGroup(("fc4",), "norm", "norm"),
        InputGroup(("fc5",), None, "explicit"),  # scaling w does not scale (1 + w)
        InputGroup(("fc6",), None, "explicit"),  # the residual add reads the norm's output
    ]
    with torch.no_grad():
        _fold_random(model, groups)
        assert torch.allclose(model(x), want, rtol=1e-4, atol=1e-5)
    assert type(model.fc1) is nn.Linear and type(model.fc4) is nn.Linear


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_norm_whose_traced_input_is_not_finite_is_not_folded_into(bad):
    model, x = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)).eval(), torch.randn(2, 5, 8)
    layers = {"1": model[1]}
    assert input_groups(model, layers, lambda: model(x)) == [InputGroup(("1",), "0", "norm")]
    x[0, 0, 0] = bad  # the numerical check cannot tell anything from a NaN output
    assert input_groups(model, layers, lambda: model(x)) == [InputGroup(("1",), None, "explicit")]


def test_a_producer_that_is_itself_scaled_or_feeds_an_unselected_layer_is_not_folded_into():
    model, x = _Mixed().eval(), torch.randn(2, 5, 8)
    groups = _mixed_groups(model, ["fc1", "fc2", "fc3"], x)
    assert groups[1] == InputGroup(("fc2", "fc3"), None, "explicit")  # fc1 is scaled too
    groups = _mixed_groups(model, ["fc2"], x)  # fc3 reads fc1's output as well
    assert groups == [InputGroup(("fc2",), None, "explicit")]


def test_a_layer_that_never_runs_is_a_group_of_its_own():
    model = nn.ModuleDict({"used": nn.Linear(4, 4), "idle": nn.Linear(4, 4)})
    x = torch.randn(3, 4)
    groups = input_groups(model, dict(model.named_children()), lambda: model["used"](x))
    assert groups == [
        InputGroup(("used",), None, "explicit"),
        InputGroup(("idle",), None, "explicit"),
    ]


def test_the_trace_stops_after_one_block_call():
    calls = []
    model = nn.Sequential(nn.Linear(4, 4))
    model.register_forward_hook(lambda m, a, o: calls.append(1))

    def run():
        for _ in range(5):
            model(torch.randn(2, 4))

    input_groups(model, {"0": model[0]}, run)
    assert calls == [1]


def test_explicit_scales_save_and_load_bit_exactly(llama, tmp_path):
    task = _tokens()
    _fold_random(llama, _blockwise_groups(llama, task))
    down = llama.lm.model.layers[1].mlp.down_proj  # a quantized layer inside a wrapper
    down.inner = QuantLinear.from_float(down.inner, QScheme(4, True, PerGroup(32)))
    loaded = load(save(llama, tmp_path / "folded.cml"), trust_factory=True)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in llama.modules()]
    for a, b in zip(_outputs(llama, task), _outputs(loaded, task), strict=True):
        assert torch.equal(a, b)


def test_explicit_scales_export_to_onnx(llama, tmp_path):
    pytest.importorskip("onnxruntime")
    from compactml.export import ort
    from compactml.export.onnx import export

    task = _tokens()
    _fold_random(llama, _blockwise_groups(llama, task))
    ids = task.calib[0]["input_ids"]
    path = export(llama, tmp_path / "folded.onnx", ids)
    got = ort.run(ort.session(path, threads=1), ids)[0]
    with torch.no_grad():
        assert abs(got - llama(ids).numpy()).max() < 1e-4


@pytest.mark.parametrize(
    "scales, match",
    [
        (torch.ones(7), "tensor of 8 values"),
        (torch.tensor([1.0] * 7 + [0.0]), "finite and positive"),
        (torch.tensor([1.0] * 7 + [float("nan")]), "finite and positive"),
        ([1.0] * 8, "tensor of 8 values"),
    ],
)
def test_bad_scales_are_refused_and_nothing_changes(scales, match):
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompactMLError, match=match):
        fold_input_scale(model, InputGroup(("1",), "0", "norm"), scales)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_quantized_layers_and_wrong_producers_are_refused():
    model = nn.Sequential(nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(CompactMLError, match=r"ReLU\) cannot take the input scales"):
        fold_input_scale(model, InputGroup(("1",), "0", "norm"), torch.ones(8))
    model[1] = QuantLinear.from_float(model[1], QScheme(8, True, PerChannel(0)))
    with pytest.raises(CompactMLError, match="fold the scales before quantizing"):
        fold_input_scale(model, InputGroup(("1",), None, "explicit"), torch.ones(8))
    with pytest.raises(CompactMLError, match="cannot wrap the model itself"):
        fold_input_scale(nn.Linear(8, 4), InputGroup(("",), None, "explicit"), torch.ones(8))


def test_scales_that_overflow_the_weights_change_nothing():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    nn.init.constant_(model[1].weight, 10.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CompactMLError, match="overflow the weights"):
        fold_input_scale(model, InputGroup(("1",), "0", "norm"), torch.full((8,), 1e38))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
