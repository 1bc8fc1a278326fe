"""Where a model comes from, and how to build its architecture again.

A ``.cml`` artifact stores weights, not code. To load it, compactml rebuilds the module tree
from the model's *source*, a small JSON-able dict recorded on the model when it is loaded:

- ``{"kind": "builtin", "name": "digits-cnn"}``: a built-in example model.
- ``{"kind": "factory", "spec": "path/file.py:fn", "path": "/abs/file.py", "sha256": "..."}``:
  a user's Python factory; the file's hash is checked before it is run again.
- ``{"kind": "hf", ...}``: a Hugging Face model folder; rebuilt from its stored config
  (see ``compactml.examples.hf``).

``resolve(ref)`` turns the MODEL argument of the CLI (a built-in name, a ``.cml`` file, a
Hugging Face folder, or ``path/to/file.py:factory``) into ``(model, task or None)``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from compactml.errors import CompactMLError, first_line
from compactml.task import Task

SOURCE_ATTR = "_compactml_source"
PATH_ATTR = "_compactml_path"


def set_source(model: nn.Module, source: dict, path: str | None = None) -> nn.Module:
    """Record on ``model`` how to rebuild its architecture (and the file it was read from)."""
    object.__setattr__(model, SOURCE_ATTR, copy.deepcopy(source))
    if path is not None:
        object.__setattr__(model, PATH_ATTR, str(Path(path).resolve()))
    return model


def get_source(model: nn.Module) -> dict | None:
    """The source recorded on ``model``, or None for a model compactml did not load."""
    source = getattr(model, SOURCE_ATTR, None)
    return copy.deepcopy(source) if source is not None else None


def get_path(model: nn.Module) -> str | None:
    """The file ``model`` was read from, if compactml read it from one."""
    return getattr(model, PATH_ATTR, None)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _split_factory(spec: str) -> tuple[Path, str]:
    file_part, _, func = spec.rpartition(":")
    if not file_part.endswith(".py") or not func.isidentifier():
        raise CompactMLError(
            f"{spec!r} is not a factory reference; write it as path/to/file.py:function_name"
        )
    return Path(file_part), func


@contextlib.contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """Let a factory file import its sibling modules while it runs (its folder on sys.path)."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def _call_factory(path: Path, func: str) -> Any:
    if not path.is_file():
        raise CompactMLError(f"model file {path} does not exist; check the path")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"_compactml_factory_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CompactMLError(f"cannot import {path}; is it a Python file?")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with _importable(path.resolve().parent):
            spec.loader.exec_module(module)
            factory = getattr(module, func, None)
            if not callable(factory):
                raise CompactMLError(
                    f"{path} has no function {func!r}; check the name after the colon"
                )
            return factory()
    except CompactMLError:
        sys.modules.pop(module_name, None)
        raise
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise CompactMLError(
            f"{path}:{func} failed with {type(exc).__name__}: {first_line(exc)}; "
            "fix the factory (run it with --debug for the traceback)"
        ) from exc


def load_factory(spec: str) -> tuple[nn.Module, Task | None]:
    """Call ``path/to/file.py:function``; it returns a model or a ``(model, task)`` pair."""
    path, func = _split_factory(spec)
    result = _call_factory(path, func)
    model, task = result if isinstance(result, tuple) else (result, None)
    if not isinstance(model, nn.Module):
        raise CompactMLError(
            f"{spec} returned {type(model).__name__}; the factory must return an nn.Module "
            "or a (model, Task) pair"
        )
    source = {
        "kind": "factory",
        "spec": spec,
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
    }
    return set_source(model, source), task


def build_base(source: dict | None, trust_factory: bool = False) -> nn.Module:
    """Build the architecture described by ``source`` (its weights are then overwritten).

    A ``factory`` source runs a Python file, so it is refused unless ``trust_factory`` is
    True: an artifact must never make compactml execute code the caller did not ask for.
    The file must also still hash to the SHA-256 recorded when the artifact was written.
    """
    kind = (source or {}).get("kind")
    if kind == "builtin":
        from compactml import examples

        return examples.build(source["name"])
    if kind == "factory":
        path = Path(source["path"])
        if not trust_factory:
            raise CompactMLError(
                f"the artifact's architecture comes from the Python file {path}, and loading "
                "it would run that file; pass model=<an instance of the architecture> to "
                "cml.load, or trust_factory=True (CLI: --trust-factory) if you trust the file"
            )
        if not path.is_file():
            raise CompactMLError(
                f"the artifact was made from {path}, which no longer exists; "
                "restore the file or pass model= to cml.load"
            )
        if file_sha256(path) != source["sha256"]:
            raise CompactMLError(
                f"{path} changed since the artifact was written; restore it or pass model= "
                "to cml.load"
            )
        model, _ = load_factory(f"{path}:{_split_factory(source['spec'])[1]}")
        return model
    if kind == "hf":
        from compactml.examples import hf

        return hf.build_from_source(source)
    raise CompactMLError(
        "the artifact does not say how to rebuild its architecture; pass model=<an instance "
        "of the architecture> to cml.load"
    )


def _artifact_task(source: dict) -> Task | None:
    """The task of the model an artifact was made from, when compactml can rebuild it."""
    if source.get("kind") == "builtin":
        from compactml import examples

        return examples.load_task(source["name"])
    if source.get("kind") == "hf":
        from compactml.examples import hf

        return hf.task_from_source(source)
    return None


def resolve(
    ref: str, progress: bool = True, trust_factory: bool = False
) -> tuple[nn.Module, Task | None]:
    """Turn a MODEL reference into ``(model, task or None)``.

    ``ref`` is a built-in name (``digits-cnn``), a ``.cml`` file, a Hugging Face model folder,
    or ``path/to/file.py:factory``. ``progress=False`` silences loading and training bars;
    ``trust_factory`` lets a ``.cml`` made from a factory file run that file (see build_base).
    """
    from compactml import examples

    if ref in examples.BUILTINS:
        return examples.load(ref, progress=progress)
    if ".py:" in ref:
        return load_factory(ref)
    path = Path(ref)
    if path.suffix == ".cml":
        if not path.is_file():
            raise CompactMLError(f"model file {path} does not exist; check the path")
        from compactml.export.artifact import load

        model = load(path, trust_factory=trust_factory)
        return model, _artifact_task(get_source(model) or {})
    if path.is_dir() and (path / "config.json").is_file():
        from compactml.examples import hf

        return hf.load_folder(path, progress=progress)
    if path.exists():
        raise CompactMLError(
            f"cannot read {ref} as a model; give a built-in name, a .cml file, a Hugging Face "
            "folder (with config.json) or path/to/file.py:factory"
        )
    known = ", ".join(sorted(examples.BUILTINS))
    raise CompactMLError(
        f"model {ref!r} not found; give a built-in name ({known}), a .cml file, a Hugging Face "
        "folder or path/to/file.py:factory"
    )
