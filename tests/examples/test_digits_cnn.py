"""digits-cnn: accuracy, the cache (fast reload, corruption recovery) and the Task's batches."""

import time

import pytest
import torch
from safetensors.torch import load, load_file, save_file

from compactml import examples
from compactml.errors import CompactMLError
from compactml.examples import digits_cnn
from compactml.source import get_source
from compactml.task import split_batch


def accuracy(model, batches) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    return correct / total


def test_trained_model_reaches_97_percent_on_test_split(digits):
    model, task = digits
    assert not model.training
    assert accuracy(model, task.batches("eval")) >= 0.97


def test_model_is_small_and_records_its_source(digits):
    model, _ = digits
    assert sum(p.numel() for p in model.parameters()) <= 50_000
    assert get_source(model) == {"kind": "builtin", "name": "digits-cnn"}


def test_second_load_reads_cache_and_gives_identical_weights(digits):
    model, _ = digits
    assert digits_cnn.cache_path().is_file()
    assert "-v1" in digits_cnn.cache_path().name
    start = time.perf_counter()
    again, _ = examples.load("digits-cnn")
    assert time.perf_counter() - start < 1.0
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def quick_retraining(monkeypatch, cache) -> list[bytes | None]:
    """Make ``digits_cnn.load`` retrain for one epoch (the full recipe's accuracy is checked
    on the session model), and record what the cache file held when each new one was written.

    The write must go through ``atomic_write_bytes`` while the old file is still in place.
    """
    real_train, real_write = digits_cnn.train, digits_cnn.atomic_write_bytes
    old_contents: list[bytes | None] = []

    def one_epoch(data, epochs=digits_cnn.EPOCHS, progress=True):
        return real_train(data, epochs=1, progress=progress)

    def recording_write(path, data):
        old_contents.append(cache.read_bytes() if cache.exists() else None)
        return real_write(path, data)

    monkeypatch.setattr(digits_cnn, "train", one_epoch)
    monkeypatch.setattr(digits_cnn, "atomic_write_bytes", recording_write)
    return old_contents


def assert_cache_replaced_and_reread(model, path, monkeypatch) -> None:
    """The cache holds exactly ``model``'s weights, alone, and the next load reads it."""
    stored = load_file(path)
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    assert list(path.parent.iterdir()) == [path]  # no temporary files left behind

    def no_training(*args, **kwargs):
        raise AssertionError("a valid cache must be read, not retrained")

    monkeypatch.setattr(digits_cnn, "train", no_training)
    again, _ = digits_cnn.load(progress=False)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in stored.items())


def test_corrupted_cache_is_retrained_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTML_CACHE", str(tmp_path))
    path = digits_cnn.cache_path()
    path.write_bytes(b"not a safetensors file")
    old_contents = quick_retraining(monkeypatch, path)
    rng_before = torch.random.get_rng_state()
    model, task = digits_cnn.load(progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # training forks the RNG
    assert old_contents == [b"not a safetensors file"]  # replaced atomically, not deleted first
    assert accuracy(model, task.batches("eval")) > 0.5  # trained (one epoch), not random
    assert_cache_replaced_and_reread(model, path, monkeypatch)


def test_cache_with_wrong_tensors_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTML_CACHE", str(tmp_path))
    path = digits_cnn.cache_path()
    save_file({"unrelated": torch.zeros(3)}, path)
    old_contents = quick_retraining(monkeypatch, path)
    model, _ = digits_cnn.load(progress=False)
    assert len(old_contents) == 1 and set(load(old_contents[0])) == {"unrelated"}
    assert_cache_replaced_and_reread(model, path, monkeypatch)


def test_build_matches_trained_architecture_without_training(digits, monkeypatch):
    model, _ = digits

    def no_training(*args, **kwargs):
        raise AssertionError("build() must not train")

    monkeypatch.setattr(digits_cnn, "train", no_training)
    built = examples.build("digits-cnn")
    trained = model.state_dict()
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in trained.items()
    }
    built.load_state_dict(trained)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(built(x), model(x))


def test_task_batches_cover_a_fixed_stratified_split(digits):
    _, task = digits
    assert task.metric == "accuracy"
    example = task.example_input()
    assert example.shape == (1, 1, 8, 8) and example.dtype == torch.float32
    sizes = {}
    for split in ("calib", "train", "eval"):
        batches = list(task.batches(split))
        x, y = split_batch(batches[0])
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        sizes[split] = sum(len(b[1]) for b in batches)
        assert set(torch.cat([b[1] for b in batches]).tolist()) == set(range(10))  # stratified
    assert sizes == {"calib": 200, "train": 1237, "eval": 360}
    first = [b[0] for b in task.batches("train")]
    second = [b[0] for b in task.batches("train")]
    # Re-iterable, and the same order every time.
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_task_alone_equals_the_loaded_task(digits):
    _, task = digits
    alone = examples.load_task("digits-cnn")
    for (xa, ya), (xb, yb) in zip(alone.batches("eval"), task.batches("eval"), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_unknown_builtin_lists_known_names():
    with pytest.raises(CompactMLError, match="digits-cnn, minilm"):
        examples.load("resnet-9000")
    with pytest.raises(CompactMLError, match="unknown built-in"):
        examples.build("nope")
