"""Pruning schedules: ``OneShot`` and ``Iterative`` (cubic ramp, fine-tuning, rewinding, resume).

A schedule decides *when* a pruning technique prunes and how much: it calls the technique's
``prune_step(model, names, sparsity, task)`` (which attaches masks in place) at each sparsity
of its ramp, and fine-tunes in between (:func:`compactml.training.fine_tune`, masks kept).

``Iterative(checkpoint="dir")`` saves the state after each finished step (safetensors of the
state dict, masks included, then a small JSON naming the step and hashing the config and the
input model, both written atomically); a rerun with the same config, model and directory starts
after the last finished step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from compactml import training
from compactml.errors import CompactMLError
from compactml.io import atomic_write_bytes, atomic_write_text
from compactml.progress import progress_bar
from compactml.prune.masks import MASK, apply_masks, get_mask
from compactml.task import Task

RAMPS = ("cubic", "linear")
STATE_FILE = "state.json"


class Prunes(Protocol):
    """What a schedule needs from a pruning technique."""

    def prune_step(self, model: nn.Module, names: list[str], sparsity: float, task: Any) -> None:
        """Attach masks at ``sparsity`` to the layers ``names`` of ``model`` (in place)."""

    def params(self) -> dict[str, Any]:
        """The config as plain values."""


@dataclasses.dataclass(frozen=True)
class OneShot:
    """Prune once to the final sparsity, with no fine-tuning (call ``cml.fine_tune`` after,
    or use :class:`Iterative`)."""

    def params(self) -> dict[str, Any]:
        """``{"kind": "one_shot"}``: the schedule as a recipe writes it."""
        return {"kind": "one_shot"}

    def needs_training(self) -> bool:
        """Whether the schedule trains (and so needs ``task.train``)."""
        return False

    def run(
        self, technique: Prunes, source: nn.Module, model: nn.Module, names: list[str], task: Any
    ) -> nn.Module:
        """Prune ``model`` (the copy, in place) once to the technique's sparsity."""
        technique.prune_step(model, names, technique.sparsity, task)  # type: ignore[attr-defined]
        return model


def _positive_int(value: Any, field: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CompactMLError(f"Iterative {field} must be an integer >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Iterative:
    """Gradual pruning: ``steps`` prunings on a ramp, fine-tuning ``epochs`` after each.

    The sparsity after step ``t`` of ``T`` is ``s_t = s_f * (1 - (1 - t/T)^3)`` (``"cubic"``,
    Zhu and Gupta 2017, "To prune, or not to prune": prune fast while many redundant weights
    remain, slowly near the end) or ``s_f * t/T`` (``"linear"``). Masks are kept during
    fine-tuning (Adam at ``lr``, cosine decay, on ``task.train``); each step's fine-tuning is
    seeded by the step number, so runs are reproducible and a resumed run equals an
    uninterrupted one.

    ``rewind=True``: after the final mask, the surviving weights (and every other parameter
    and buffer) go back to the input model's values, which are then fine-tuned with the final
    mask for ``steps * epochs`` epochs (lottery-ticket rewinding: Frankle and Carbin 2019, "The
    Lottery Ticket Hypothesis"; rewinding to a trained model as in Renda et al. 2020).

    ``checkpoint``: a directory where the state is saved after each finished step; a rerun
    with the same config and model resumes after the last one.
    """

    steps: int = 5
    epochs: int = 1
    lr: float = 1e-3
    ramp: str = "cubic"
    rewind: bool = False
    checkpoint: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _positive_int(self.steps, "steps", 1)
        _positive_int(self.epochs, "epochs", 0)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
            raise CompactMLError(f"Iterative lr must be a positive number such as 1e-3, got {lr!r}")
        if self.ramp not in RAMPS:
            raise CompactMLError(f"ramp={self.ramp!r} is not known; use one of {', '.join(RAMPS)}")
        for field in ("rewind", "progress"):
            if not isinstance(getattr(self, field), bool):
                raise CompactMLError(f"{field} must be true or false, got {getattr(self, field)!r}")
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, str | Path):
                raise CompactMLError(
                    f"checkpoint must be a directory path or None, got {self.checkpoint!r}"
                )
            object.__setattr__(self, "checkpoint", str(self.checkpoint))

    def params(self) -> dict[str, Any]:
        """The schedule as a recipe writes it: ``{"kind": "iterative", "steps": 5, ...}``."""
        return {"kind": "iterative"} | dataclasses.asdict(self)

    def needs_training(self) -> bool:
        """Whether the schedule trains (and so needs ``task.train``)."""
        return self.epochs > 0

    def sparsity_at(self, step: int, final: float) -> float:
        """The target sparsity after ``step`` (1..steps) for a final sparsity ``final``."""
        frac = step / self.steps
        if self.ramp == "linear":
            return final * frac
        return final * (1.0 - (1.0 - frac) ** 3)

    def _train(self, model: nn.Module, task: Task, step: int, epochs: int, what: str) -> None:
        if epochs == 0:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step)
            training.fine_tune(
                model, task, epochs, float(self.lr), progress=self.progress, description=what
            )

    def run(
        self, technique: Prunes, source: nn.Module, model: nn.Module, names: list[str], task: Any
    ) -> nn.Module:
        """Prune ``model`` (the copy, in place) step by step, fine-tuning in between, starting
        after the last step saved in ``checkpoint`` if any; returns the model."""
        if self.epochs > 0 and not (isinstance(task, Task) and task.has("train")):
            raise CompactMLError(
                "the Iterative schedule fine-tunes on task.train; pass a Task with train batches"
            )
        final = technique.sparsity  # type: ignore[attr-defined]
        store = Checkpoint(self.checkpoint, technique, source) if self.checkpoint else None
        done, rewound = store.resume(model) if store else (0, False)
        steps = range(done + 1, self.steps + 1)
        for step in progress_bar(steps, "pruning steps", total=len(steps), enabled=self.progress):
            technique.prune_step(model, names, self.sparsity_at(step, final), task)
            self._train(model, task, step, self.epochs, f"fine-tuning (step {step}/{self.steps})")
            if store:
                store.save(model, step, rewound=False)
        if self.rewind and not rewound:
            rewind(model, source)
            self._train(model, task, self.steps + 1, self.steps * self.epochs, "rewound training")
            if store:
                store.save(model, self.steps, rewound=True)
        return model


def _is_mask(key: str) -> bool:
    return key.rpartition(".")[2] == MASK


def rewind(model: nn.Module, source: nn.Module) -> nn.Module:
    """Put ``source``'s parameters and buffers back into ``model`` (in place), masks kept and
    re-applied: the surviving weights take their values in ``source``."""
    state = {k: v for k, v in source.state_dict().items() if not _is_mask(k)}
    missing = [k for k in model.state_dict() if k not in state and not _is_mask(k)]
    if missing:
        raise CompactMLError(f"cannot rewind: the input model lacks {missing[0]}")
    model.load_state_dict(state, strict=False)
    return apply_masks(model)


def fingerprint(technique: Prunes, source: nn.Module) -> str:
    """SHA-256 of the config's parameters and the input model's state: a checkpoint is resumed
    only by the run that made it."""
    digest = hashlib.sha256()
    params = technique.params()
    if isinstance(params.get("schedule"), dict):  # the progress bar does not change the result
        params["schedule"] = {k: v for k, v in params["schedule"].items() if k != "progress"}
    config = {"technique": type(technique).__name__, "params": params}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in source.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Checkpoint:
    """The state of an iterative run in a directory: ``step-<t>.safetensors`` (the state dict,
    masks included) and ``state.json`` (``step``, ``rewound``, ``file``, ``fingerprint``).
    The JSON is written last, so a crash mid-save leaves the previous step readable."""

    def __init__(self, directory: str, technique: Prunes, source: nn.Module) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise CompactMLError(f"checkpoint {directory} is a file; give a directory path")
        self.fingerprint = fingerprint(technique, source)

    def resume(self, model: nn.Module) -> tuple[int, bool]:
        """Load the last finished step into ``model`` (in place); ``(step, rewound)``, or
        ``(0, False)`` when the directory holds no state."""
        path = self.directory / STATE_FILE
        if not path.is_file():
            return 0, False
        try:
            state = json.loads(path.read_text("utf-8"))
            step, rewound, file = int(state["step"]), bool(state["rewound"]), str(state["file"])
            stored = state["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CompactMLError(
                f"checkpoint {path} is unreadable ({exc}); delete the directory to start over"
            ) from exc
        if stored != self.fingerprint:
            raise CompactMLError(
                f"checkpoint {self.directory} belongs to a run with another config or input "
                "model; use a new checkpoint directory or delete this one"
            )
        try:
            tensors = safetensors.torch.load_file(self.directory / Path(file).name)
        except (OSError, SafetensorError) as exc:
            raise CompactMLError(
                f"checkpoint weights in {self.directory} are unreadable ({exc}); delete the "
                "directory to start over"
            ) from exc
        load_masked_state(model, tensors)
        return step, rewound

    def save(self, model: nn.Module, step: int, rewound: bool) -> None:
        """Write the state after ``step`` atomically, then drop older weight files."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"step-{step}{'-rewound' if rewound else ''}.safetensors"
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        atomic_write_bytes(self.directory / name, safetensors.torch.save(state))
        info = {"step": step, "rewound": rewound, "file": name, "fingerprint": self.fingerprint}
        atomic_write_text(self.directory / STATE_FILE, json.dumps(info, indent=1))
        for old in self.directory.glob("step-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)


def load_masked_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load a state dict holding ``weight_mask`` entries into ``model`` (in place): masks the
    model lacks are registered first, then everything is loaded strictly."""
    for key, value in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if leaf == MASK:
            layer = model.get_submodule(owner)
            if get_mask(layer) is None:
                layer.register_buffer(MASK, torch.ones_like(value, dtype=torch.bool))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CompactMLError(
            f"the checkpoint does not fit the model ({str(exc).splitlines()[0]}); delete the "
            "checkpoint directory to start over"
        ) from exc
