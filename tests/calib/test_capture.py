"""The block-by-block runner: block discovery, captured inputs (args and kwargs), the inputs
each block sees after the blocks before it were changed, and bad calibration data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactml.calib.capture import Block, Call, collect, find_blocks, run_blockwise
from compactml.errors import CompactMLError
from compactml.task import Task, split_batch


class Recorder:
    """An accumulator that keeps every input (to compare with a plain forward pass)."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self.inputs.append(x.clone())


def _inputs_in_forward(model: nn.Module, task: Task, names: list[str]) -> dict[str, list]:
    """The input of each named module in plain forward passes over the calibration batches,
    without the padding positions of batches that have an attention mask."""
    seen: dict[str, list] = {name: [] for name in names}
    mask = None

    def record(name: str, x: torch.Tensor) -> None:
        if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
            x = x[mask.bool()]
        seen[name].append(x.clone())

    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: record(name, args[0])
        )
        for name in names
    ]
    with torch.no_grad():
        for batch in task.batches("calib"):
            inputs = split_batch(batch)[0]
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            task.run(model, inputs)
    for handle in handles:
        handle.remove()
    return seen


def _run_changing_blocks(model: nn.Module, task: Task, watch: str, change: str):
    """Run the blocks, recording the input of each block's ``watch`` layer and of every layer
    outside the blocks, and halving each block's ``change`` layer (a stand-in for
    compression). Returns (recorded inputs by layer name, run info, block names seen)."""
    recorded: dict[str, list] = {}
    units: list[str] = []

    def step(block: Block) -> None:
        units.append(block.name)
        names = [n for n, m in block.named_modules() if type(m) is nn.Linear]
        if block.name:
            names = [f"{block.name}.{watch}"]
        stats = collect(block, {n: model.get_submodule(n) for n in names}, Recorder)
        recorded.update({n: s.inputs for n, s in stats.items()})
        if block.name:
            block.module.get_submodule(change).weight.mul_(0.5)

    info = run_blockwise(model, task, step, progress=False)
    return recorded, info, units


def _assert_same_inputs(recorded: dict[str, list], model: nn.Module, task: Task) -> None:
    expected = _inputs_in_forward(model, task, list(recorded))
    for name, inputs in recorded.items():
        assert len(inputs) == len(expected[name]) > 0, name
        for got, want in zip(inputs, expected[name], strict=True):
            assert torch.allclose(got, want, atol=1e-5), name


def test_recorded_calls_drop_key_value_caches_and_find_the_hidden_state():
    class Cache:  # the name transformers' cache classes derive from
        pass

    class DynamicCache(Cache):
        pass

    h, mask = torch.ones(2, 3), torch.zeros(2, 3)
    call = Call.record((h, DynamicCache()), {"past_key_values": DynamicCache(), "use_cache": True})
    assert call.args == (h, None) and call.slot == 0
    assert call.kwargs == {"past_key_values": None, "use_cache": False}
    by_name = Call.record((), {"mask": mask, "hidden_states": h})
    assert by_name.slot == "hidden_states" and by_name.hidden() is h
    assert by_name.with_hidden(mask).kwargs == {"mask": mask, "hidden_states": mask}
    assert Call.record((None,), {"flag": True}) is None


def test_find_blocks_picks_the_module_list_holding_the_most_parameters(models):
    model = models.Stack(depth=3)
    assert [name for name, _ in find_blocks(model)] == ["layers.0", "layers.1", "layers.2"]
    assert find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == []


def test_each_block_sees_the_outputs_of_the_changed_blocks_before_it(models):
    model, task = models.Stack(depth=3), models.stack_task()
    recorded, info, units = _run_changing_blocks(model, task, "fc1", "fc2")
    assert units == ["layers.0", "layers.1", "layers.2", ""]
    assert info == {"blocks": ["layers.0", "layers.1", "layers.2"], "calib_batches": 3}
    assert set(recorded) == {"layers.0.fc1", "layers.1.fc1", "layers.2.fc1", "inp", "head"}
    # the keyword argument (scale) and the positional mask were replayed: a forward pass of the
    # changed model gives every recorded input
    _assert_same_inputs(recorded, model, task)


def test_blocks_stop_the_capture_pass_at_the_first_block(models):
    model, task = models.Stack(depth=2), models.stack_task(batches=2)
    calls = {"head": 0}
    model.head.register_forward_pre_hook(lambda m, a: calls.__setitem__("head", calls["head"] + 1))
    run_blockwise(model, task, lambda block: None, progress=False)
    # one probe pass on the first batch reaches the head; the capture passes stop early and
    # the model-level pass does not run when the step collects nothing
    assert calls["head"] == 1


def test_limit_on_calibration_batches(models):
    model, task = models.Stack(depth=2), models.stack_task(batches=3)
    recorded, info, _ = _run_changing_blocks(model, models.stack_task(batches=3), "fc1", "fc2")
    assert info["calib_batches"] == 3
    info = run_blockwise(model, task, lambda block: None, batches=2, progress=False)
    assert info["calib_batches"] == 2


def test_hugging_face_llama_blocks_with_rotary_embeddings_and_a_cache(models):
    model, task = models.tiny_llama(), models.token_task(padded=True)
    assert model.config.use_cache  # the model makes a key/value cache unless told not to
    recorded, info, _ = _run_changing_blocks(model, task, "self_attn.q_proj", "self_attn.o_proj")
    assert info["blocks"] == ["model.layers.0", "model.layers.1"]
    assert set(recorded) >= {"model.layers.1.self_attn.q_proj", "lm_head"}
    _assert_same_inputs(recorded, model, task)


def test_hugging_face_bert_blocks_with_padding_masks(models):
    model, task = models.tiny_bert(), models.token_task(padded=True)
    recorded, info, _ = _run_changing_blocks(model, task, "intermediate.dense", "output.dense")
    assert info["blocks"] == ["encoder.encoder.layer.0", "encoder.encoder.layer.1"]
    assert "encoder.pooler.dense" in recorded
    _assert_same_inputs(recorded, model, task)


class Parallel(nn.Module):
    """A ModuleList of branches whose outputs are summed: not a chain of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


def test_a_module_list_that_is_not_a_chain_is_calibrated_as_one_block():
    model = Parallel()
    task = Task(calib=[torch.randn(4, 8) for _ in range(2)])
    units = []

    def step(block: Block) -> None:
        units.append(block.name)
        stats = collect(block, dict(block.named_modules()) | {}, lambda m: Recorder(m))
        assert all(stats[f"branches.{i}"].inputs for i in range(3))

    with pytest.warns(UserWarning, match="do not run one after the other"):
        info = run_blockwise(model, task, step, progress=False)
    assert units == [""] and info == {"blocks": [], "calib_batches": 2}


def test_blocks_given_different_arguments_are_calibrated_as_one_block(models):
    class PerLayerScale(models.Stack):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            for i, layer in enumerate(self.layers):  # a new scale for every layer
                h = layer(h, mask, scale=torch.full((1,), 0.5 + i))[0]
            return self.head(h)

    model, task = PerLayerScale(depth=2), models.stack_task()
    with pytest.warns(UserWarning, match="with the same other arguments"):
        recorded, info, units = _run_changing_blocks(model, task, "fc1", "fc2")
    assert units == [""] and info["blocks"] == []
    assert len(recorded) == 6  # every Linear, from one pass of the whole model
    _assert_same_inputs(recorded, model, task)


def test_a_model_without_blocks_is_one_unit():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    task = Task(calib=[torch.randn(4, 8) for _ in range(2)])
    seen = []

    def step(block: Block) -> None:
        seen.append(block.name)
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        stats = collect(block, linears, Recorder)
        assert [len(s.inputs) for s in stats.values()] == [2, 2]

    assert run_blockwise(model, task, step, progress=False)["calib_batches"] == 2
    assert seen == [""]


@pytest.mark.parametrize("position", [0, 1])
def test_a_batch_that_does_not_fit_names_its_shape(models, position):
    model, task = models.Stack(depth=2), models.stack_task(batches=2)
    data = list(task.calib)
    data[position] = {"x": torch.randn(4, 6, 5), "mask": data[position]["mask"]}
    with pytest.raises(CompactMLError, match=r"calibration batch \{x: tensor\(4, 6, 5\)"):
        run_blockwise(model, Task(calib=data), lambda block: None, progress=False)


@pytest.mark.parametrize("task", [None, Task(), Task(calib=[])])
def test_missing_or_empty_calibration_data_is_a_clear_error(models, task):
    with pytest.raises(CompactMLError, match="calib"):
        run_blockwise(models.Stack(), task, lambda block: None, progress=False, who="GPTQ")
