"""tiny-llama: the stdlib corpus split, the BPE tokenizer, training, the cache and the Task.

Everything runs on a tiny recipe (a 2-layer, 32-wide Llama on a few stdlib modules) that trains
in about a second; the full model is only checked by the slow test, and only when it is cached.
"""

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import compactml as cml  # noqa: E402
from compactml import examples  # noqa: E402
from compactml.examples import stdlib_text  # noqa: E402
from compactml.examples import tiny_llama as tl  # noqa: E402
from compactml.source import get_source  # noqa: E402
from compactml.task import split_batch  # noqa: E402

TINY = tl.Recipe(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    layers=2,
    heads=2,
    context=32,
    batch_size=8,
    steps=40,
    learning_rate=1e-2,
    warmup_steps=5,
    max_train_modules=8,
    max_eval_modules=2,
)
TRICKY = 'def f(x):\n\treturn x  # naïve → ✓\r\n\n    """doc"""  \n'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny recipe trained once into a module-wide cache: (model, task, cache folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMPACTML_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(tl, "RECIPE", TINY)
        model, task = tl.load(progress=False)
        return model, task, tl.cache_folder()


@pytest.fixture
def use_tiny(tiny, monkeypatch):
    """For one test: the tiny recipe is the built-in's, cached where ``tiny`` trained it."""
    monkeypatch.setenv("COMPACTML_CACHE", str(tiny[2].parent))
    monkeypatch.setattr(tl, "RECIPE", TINY)
    return tiny


@pytest.fixture
def tiny_cache(tiny, tmp_path, monkeypatch):
    """A fresh copy of the tiny cache folder in ``tmp_path``, for tests that damage it."""
    monkeypatch.setenv("COMPACTML_CACHE", str(tmp_path))
    monkeypatch.setattr(tl, "RECIPE", TINY)
    folder = tl.cache_folder()
    folder.mkdir()
    for file in tiny[2].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def no_training(*args, **kwargs):
    raise AssertionError("a valid cache must be read, not retrained")


def tiny_texts() -> list[str]:
    split = TINY.modules()
    return stdlib_text.read_texts(split.root, split.train)


def test_tokenizer_is_deterministic_and_round_trips_any_text():
    first = tl.train_tokenizer(tiny_texts(), TINY.vocab_size)
    second = tl.train_tokenizer(tiny_texts(), TINY.vocab_size)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == TINY.vocab_size and first.token_to_id(tl.EOS) == 0
    for text in (TRICKY, tiny_texts()[0], "ünïcödé 漢字 \x00\x7f"):
        ids = first.encode(text).ids
        assert first.decode(ids) == text
    source = tiny_texts()[0]
    assert len(first.encode(source).ids) < 0.8 * len(source.encode())  # merges were learned


def test_held_out_modules_are_whole_and_never_trained_on():
    split = stdlib_text.stdlib_split()
    assert split.train and split.eval and not set(split.train) & set(split.eval)
    assert 0.02 < len(split.eval) / (len(split.train) + len(split.eval)) < 0.1
    assert all(stdlib_text.is_held_out(name) for name in split.eval)
    assert not any(stdlib_text.is_held_out(name) for name in split.train)
    names = split.train + split.eval
    assert not any(set(name.split("/")[:-1]) & stdlib_text.EXCLUDED_DIRS for name in names)
    assert "os.py" in split.train + split.eval and "json/decoder.py" in names
    # The split depends on names only: a subset splits the same way.
    subset = stdlib_text.split_modules(split.root, tuple(sorted(names))[::7])
    assert set(subset.eval) <= set(split.eval) and set(subset.train) <= set(split.train)


def test_eval_windows_hold_only_held_out_text(use_tiny):
    _, task, _ = use_tiny
    tokenizer = tl.cached_tokenizer()
    split = TINY.modules()
    held_out = "".join(stdlib_text.read_texts(split.root, split.eval))
    for input_ids, labels in task.batches("eval"):
        assert torch.equal(input_ids, labels) and input_ids.shape[1] == TINY.context
        for row in input_ids:
            text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
            assert text[:20] in held_out  # the window's text comes from the held-out modules


def eval_nll(model, task) -> float:
    return cml.evaluate(model, task)["nll"]


def test_tiny_model_learns(tiny):
    model, task, _ = tiny
    untrained = tl.new_model(TINY)
    before, after = eval_nll(untrained, task), eval_nll(model, task)
    assert before > math.log(TINY.vocab_size) - 0.5  # random init: about uniform
    assert after < before - 1.5


def test_task_shapes_and_finite_perplexity(tiny):
    model, task, _ = tiny
    assert task.metric == "perplexity" and task.kind == "language_model"
    example = task.example_input()
    assert example.shape == (1, TINY.context) and example.dtype == torch.long
    calib = list(task.batches("calib"))
    assert torch.equal(split_batch(calib[0])[0][:1], example)  # example = first calib window
    assert sum(len(b[0]) for b in calib) <= tl.CALIB_SEQUENCES
    assert all(b[0].shape[1:] == (TINY.context,) for b in calib)
    first, second = ([b[0] for b in task.batches("train")] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # fixed order
    metrics = cml.evaluate(model, task)
    assert math.isfinite(metrics["perplexity"]) and 1 < metrics["perplexity"] < TINY.vocab_size
    loss = task.batch_loss(model, calib[0])
    assert torch.isfinite(loss) and loss.requires_grad


def test_cache_round_trips_bit_exactly(use_tiny, monkeypatch):
    model, _, folder = use_tiny
    assert sorted(p.name for p in folder.iterdir()) == [tl.CONFIG, tl.WEIGHTS, tl.TOKENIZER]
    monkeypatch.setattr(tl, "train", no_training)
    monkeypatch.setattr(tl, "train_tokenizer", no_training)
    again, task = tl.load(progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert tl.cached_tokenizer().to_str() == (folder / tl.TOKENIZER).read_text()
    with safe_open(str(folder / tl.WEIGHTS), framework="pt") as handle:
        assert json.loads(handle.metadata()["recipe"]) == dataclasses.asdict(TINY)
    config = json.loads((folder / tl.CONFIG).read_text())
    assert config["hidden_size"] == TINY.hidden_size and config["num_hidden_layers"] == 2
    assert get_source(again) == {"kind": "builtin", "name": "tiny-llama"}


def test_cache_folder_is_a_hugging_face_model_folder(tiny):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model, task, folder = tiny
    again = LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    ids = task.example_input()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids))
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / tl.TOKENIZER))
    assert tokenizer.decode(tokenizer(TRICKY)["input_ids"]) == TRICKY


def test_task_alone_equals_the_loaded_task(use_tiny, monkeypatch):
    _, task, _ = use_tiny
    monkeypatch.setattr(tl, "train", no_training)
    alone = examples.load_task("tiny-llama")
    for a, b in zip(alone.batches("eval"), task.batches("eval"), strict=True):
        assert torch.equal(a[0], b[0])
    assert torch.equal(alone.example_input(), task.example_input())


def test_cache_folder_changes_with_the_recipe(monkeypatch):
    changed = dataclasses.replace(TINY, steps=TINY.steps + 1)
    assert tl.cache_folder(changed) != tl.cache_folder(TINY)
    assert f"-v{tl.RECIPE_VERSION}-" in tl.cache_folder(TINY).name
    monkeypatch.setattr(tl, "RECIPE_VERSION", tl.RECIPE_VERSION + 1)
    assert f"-v{tl.RECIPE_VERSION}-" in tl.cache_folder(TINY).name


def test_corrupt_weights_are_retrained_identically(tiny, tiny_cache, caplog):
    path = tiny_cache / tl.WEIGHTS
    path.write_bytes(b"not a safetensors file")
    model, _ = tl.load(progress=False)
    assert "unreadable" in caplog.text and "retraining" in caplog.text
    for key, value in tiny[0].state_dict().items():  # training is deterministic
        assert torch.equal(model.state_dict()[key], value), key
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(model.lm.state_dict())
    assert not [p for p in tiny_cache.iterdir() if p.name.endswith(".tmp")]


def test_non_finite_weights_are_retrained(tiny, tiny_cache, caplog):
    path = tiny_cache / tl.WEIGHTS
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    state["lm_head.weight"][0, 0] = float("nan")  # Hugging Face names in the cache
    save_file(state, path, metadata=metadata)
    model, _ = tl.load(progress=False)
    assert "NaN/Inf" in caplog.text
    assert torch.isfinite(model.lm.lm_head.weight).all()


def test_corrupt_tokenizer_is_retrained_and_weights_kept(tiny, tiny_cache, caplog, monkeypatch):
    original = (tiny_cache / tl.TOKENIZER).read_text()
    (tiny_cache / tl.TOKENIZER).write_text('{"truncated": ')
    (tiny_cache / tl.CONFIG).write_text("[]")
    monkeypatch.setattr(tl, "train", no_training)  # same tokenizer again, so the weights fit
    model, _ = tl.load(progress=False)
    assert "tokenizer" in caplog.text and "config" in caplog.text
    assert (tiny_cache / tl.TOKENIZER).read_text() == original
    assert json.loads((tiny_cache / tl.CONFIG).read_text())["vocab_size"] == TINY.vocab_size
    assert torch.equal(model.lm.lm_head.weight, tiny[0].lm.lm_head.weight)


def test_weights_of_another_tokenizer_are_retrained(tiny, tiny_cache, caplog):
    path = tiny_cache / tl.WEIGHTS
    with safe_open(str(path), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    save_file(state, path, metadata={"tokenizer_sha256": "0" * 64})
    tl.load(progress=False)
    assert "another tokenizer" in caplog.text


def test_save_and_load_give_equal_logits(use_tiny, tmp_path):
    model, task, _ = use_tiny
    loaded = cml.load(cml.save(model, tmp_path / "tiny.cml"))
    assert type(loaded) is tl.CausalLM and type(loaded.lm).__name__ == "LlamaForCausalLM"
    assert get_source(loaded) == {"kind": "builtin", "name": "tiny-llama"}
    ids = task.example_input()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_onnx_export_matches_for_any_batch_size(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, task, _ = tiny
    path = cml.export(model, tmp_path / "tiny.onnx", task.example_input())
    session = ort.InferenceSession(str(path))
    (name,) = [i.name for i in session.get_inputs()]  # input ids only: no mask, no options
    ids = next(task.batches("eval"))[0]
    (logits,) = session.run(None, {name: ids.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(logits), model(ids), atol=1e-4)


def test_builtin_table_builds_without_training(monkeypatch):
    monkeypatch.setattr(tl, "RECIPE", TINY)
    monkeypatch.setattr(tl, "train", no_training)
    assert examples.BUILTINS["tiny-llama"] is tl
    built = examples.build("tiny-llama")
    assert not built.training and built.lm.config.num_hidden_layers == TINY.layers
    assert isinstance(built.lm.model.layers, torch.nn.ModuleList)
    layer = built.lm.model.layers[0]
    projections = [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    projections += [getattr(layer.self_attn, f"{x}_proj") for x in "qkvo"]
    assert all(type(m) is torch.nn.Linear for m in projections)


def test_full_recipe_widths_fit_quantization_groups():
    # Every Linear reads hidden_size or intermediate_size features: groups of 64 and 128 fit.
    assert tl.RECIPE.hidden_size % 128 == 0 and tl.RECIPE.intermediate_size % 128 == 0
    assert tl.RECIPE.hidden_size % tl.RECIPE.heads == 0


@pytest.mark.slow
def test_full_model_perplexity_on_held_out_modules():
    """The real model, only when already cached (CI never trains it)."""
    weights = tl.cache_folder() / tl.WEIGHTS
    if not weights.is_file():
        pytest.skip(f"the full tiny-llama is not cached ({weights}); load it once to train it")
    model, task = examples.load("tiny-llama", progress=False)
    assert 3e6 < sum(p.numel() for p in model.parameters()) < 10e6
    assert cml.evaluate(model, task)["perplexity"] < 60  # 49.7 when trained on Python 3.11
