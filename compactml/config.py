"""``Technique``: the base of every compression config (quantize, prune, factorize, ...).

A technique is a frozen dataclass (its config) with one method, ``apply(model, task)``, that
returns a new model: it validates itself in ``__post_init__``, never mutates the model it is
given (it works on a deep copy, which keeps the model's recorded source), and reads data only
through the Task. Every config carries ``include``/``exclude`` patterns on module names.

A technique records what it did on the model it returns (:func:`record`): its name and
parameters, the layers it changed and the layers it had to leave alone with the reason, so
reports can list them (:func:`history`).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import fnmatch
from typing import Any, ClassVar

from torch import nn

from compactml.errors import CompactMLError
from compactml.task import Task

HISTORY_ATTR = "_compactml_history"


def check_patterns(value: Any, field: str) -> tuple[str, ...]:
    """``value`` as a tuple of module-name patterns (one string is one pattern); raises
    CompactMLError for anything else."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, tuple | list) or not all(isinstance(p, str) for p in value):
        raise CompactMLError(
            f"{field} must be a list of module-name patterns such as ('*.attention.*',), "
            f"got {value!r}"
        )
    return tuple(value)


def check_bools(config: Any, *names: str) -> None:
    """Raise unless each named field of ``config`` is True or False."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise CompactMLError(f"{name} must be true or false, got {value!r}")


def check_positive_ints(config: Any, *names: str) -> None:
    """Raise unless each named field of ``config`` is an integer >= 1; None passes where it is
    the field's default (an optional count such as ``calib_batches``)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name in names:
        value = getattr(config, name)
        if value is None and defaults.get(name) is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CompactMLError(
                f"{type(config).__name__} {name} must be a positive integer, got {value!r}"
            )


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True when ``name`` or one of its dotted parents matches a pattern (fnmatch, case kept):
    ``"encoder"`` matches ``encoder.layer.0.attn`` too, ``"*"`` matches every name."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Technique(abc.ABC):
    """Base config: ``include`` / ``exclude`` patterns on module names (see :func:`matches`).

    Subclasses set the class attribute ``family`` (``"quantize"``, ``"prune"``, ...) and
    implement ``apply(model, task=None) -> nn.Module``, which must not modify ``model``.
    A subclass whose strength is one field sets ``level`` to that field's name, so a
    sensitivity scan (``compactml.sensitivity``) can vary it.
    """

    family: ClassVar[str] = ""
    #: The name of the field that says how much the technique compresses: bits, sparsity,
    #: ratio, ... (None when there is no such single field).
    level: ClassVar[str | None] = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", check_patterns(self.include, "include"))
        object.__setattr__(self, "exclude", check_patterns(self.exclude, "exclude"))

    def selects(self, name: str) -> bool:
        """True when the module called ``name`` is included and not excluded."""
        return matches(name, self.include) and not matches(name, self.exclude)

    def targets(
        self, model: nn.Module, types: tuple[type[nn.Module], ...]
    ) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every selected module whose type is exactly one of ``types``
        (subclasses are left out: they may compute something else in ``forward``)."""
        return [
            (name, module)
            for name, module in model.named_modules()
            if type(module) in types and self.selects(name)
        ]

    def params(self) -> dict[str, Any]:
        """The config's fields as plain values (tuples as lists), as a recipe would write them."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    @staticmethod
    def copy_model(model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` to work on (the recorded source and history come along)."""
        if not isinstance(model, nn.Module):
            raise CompactMLError(
                f"expected a torch nn.Module, got {type(model).__name__}; pass the model object"
            )
        return copy.deepcopy(model)

    @abc.abstractmethod
    def apply(self, model: nn.Module, task: Task | None = None) -> nn.Module:
        """Return a compressed copy of ``model``; ``model`` itself is left unchanged."""


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` inside ``root`` (which is changed in place)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def record(
    model: nn.Module,
    technique: Technique,
    changed: list[str],
    skipped: dict[str, str] | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Append what ``technique`` did to ``model``'s history: the layers it ``changed``, the
    ones it ``skipped`` (name -> reason), and any JSON-able ``details`` (e.g. a per-layer plan),
    for reports."""
    entry = {
        "technique": type(technique).__name__,
        "family": technique.family,
        "params": technique.params(),
        "changed": list(changed),
        "skipped": dict(skipped or {}),
        **(details or {}),
    }
    object.__setattr__(model, HISTORY_ATTR, history(model) + [entry])


def history(model: nn.Module) -> list[dict[str, Any]]:
    """The techniques applied to ``model`` so far, oldest first (copies of the records)."""
    return copy.deepcopy(getattr(model, HISTORY_ATTR, []))
