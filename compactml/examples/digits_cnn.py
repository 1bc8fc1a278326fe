"""digits-cnn: a small CNN trained on scikit-learn's bundled 8x8 handwritten digits.

The data ships with scikit-learn (1,797 images of 8x8 pixels, 10 classes; from the UCI
"Optical Recognition of Handwritten Digits" set), so nothing is downloaded. The model is
trained once per machine with a fixed recipe (a few seconds on a laptop CPU) and cached as a
safetensors file in :func:`compactml.cache.cache_dir`; later loads read the cache.

Changing the architecture, the split or the training recipe must bump ``RECIPE_VERSION`` so
that old caches are not read as the new model.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from compactml.cache import cache_dir
from compactml.io import atomic_write_bytes
from compactml.progress import progress_bar
from compactml.source import set_source
from compactml.task import Task

NAME = "digits-cnn"
RECIPE_VERSION = 1
SEED = 0
TEST_SIZE = 360  # images in the test (eval) split
CALIB_SIZE = 200  # images in the calibration split
BATCH_SIZE = 64
EPOCHS = 30
LEARNING_RATE = 3e-3

log = logging.getLogger(__name__)


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks with max pooling and a linear classifier (about 15k params).

    Input: ``(batch, 1, 8, 8)`` float images in [0, 1]. Output: ``(batch, 10)`` logits.
    """

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w1, w2 = width, 2 * width
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(1, w1, 3, padding=1, bias=False),
                bn1=nn.BatchNorm2d(w1),
                relu1=nn.ReLU(),
                conv2=nn.Conv2d(w1, w2, 3, padding=1, bias=False),
                bn2=nn.BatchNorm2d(w2),
                relu2=nn.ReLU(),
                pool1=nn.MaxPool2d(2),  # 8x8 -> 4x4
                conv3=nn.Conv2d(w2, w2, 3, padding=1, bias=False),
                bn3=nn.BatchNorm2d(w2),
                relu3=nn.ReLU(),
                pool2=nn.MaxPool2d(2),  # 4x4 -> 2x2
            )
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(w2 * 2 * 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify images ``(batch, 1, 8, 8)`` into logits ``(batch, classes)``."""
        return self.classifier(self.flatten(self.features(x)))


@dataclass(frozen=True)
class DigitsData:
    """The fixed stratified split: images ``(N, 1, 8, 8)`` float32 in [0, 1], labels int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    calib_x: torch.Tensor
    calib_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_data() -> DigitsData:
    """Load the bundled digits and split them (stratified, fixed seed) into train/calib/test."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SEED
    )
    train_x, calib_x, train_y, calib_y = train_test_split(
        rest_x, rest_y, test_size=CALIB_SIZE, stratify=rest_y, random_state=SEED
    )
    parts = (train_x, train_y, calib_x, calib_y, test_x, test_y)
    return DigitsData(*(torch.from_numpy(np.ascontiguousarray(part)) for part in parts))


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, ...]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def new_model() -> DigitsCNN:
    """A :class:`DigitsCNN` with seeded random weights; the global random state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return DigitsCNN()


def train(data: DigitsData, epochs: int = EPOCHS, progress: bool = True) -> DigitsCNN:
    """Train a fresh :class:`DigitsCNN` with the fixed recipe (seeded Adam, one-cycle schedule).

    The global torch random state is saved and restored, so calling this has no side effects.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = DigitsCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        steps = epochs * -(-len(data.train_x) // BATCH_SIZE)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps)
        model.train()
        for _ in progress_bar(range(epochs), f"training {NAME} (once)", enabled=progress):
            order = torch.randperm(len(data.train_x))
            for x, y in _batches(data.train_x[order], data.train_y[order], BATCH_SIZE):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                schedule.step()
    return model.eval()


def cache_path() -> Path:
    """Where the trained weights are cached; the name carries the recipe version."""
    return cache_dir() / f"{NAME}-v{RECIPE_VERSION}.safetensors"


def _read_cache(path: Path) -> DigitsCNN | None:
    """The cached model, or None when the file is missing, damaged or does not fit."""
    if not path.is_file():
        return None
    model = new_model()
    try:
        state = load_file(path)
        model.load_state_dict(state, strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        log.warning("cached %s weights in %s are unreadable (%s); retraining", NAME, path, exc)
        return None
    if not all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()):
        log.warning("cached %s weights in %s hold NaN/Inf; retraining", NAME, path)
        return None
    return model.eval()


def build() -> nn.Module:
    """The architecture only, with random weights (no training), in eval mode."""
    return new_model().eval()


def task(data: DigitsData | None = None) -> Task:
    """The classification Task: calib, train (shuffled once, fixed) and eval (test) batches."""
    data = data or load_data()
    generator = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(data.train_x), generator=generator)
    return Task(
        calib=_batches(data.calib_x, data.calib_y, BATCH_SIZE),
        train=_batches(data.train_x[order], data.train_y[order], BATCH_SIZE),
        eval=_batches(data.test_x, data.test_y, 128),
        metric="accuracy",
        example=data.test_x[:1].clone(),
        name=NAME,
    )


def load(progress: bool = True) -> tuple[nn.Module, Task]:
    """The trained model (eval mode) and its Task; trains and caches it on first use."""
    data = load_data()
    path = cache_path()
    model = _read_cache(path)
    if model is None:
        model = train(data, progress=progress)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(path, save(state, metadata={"recipe_version": str(RECIPE_VERSION)}))
    set_source(model, {"kind": "builtin", "name": NAME})
    return model, task(data)
