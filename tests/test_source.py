"""Model references: factories run safely and clearly, artifacts never run code by themselves."""

import pytest
import torch

from compactml.errors import CompactMLError
from compactml.source import build_base, get_source, load_factory, resolve

GOOD = """
from __future__ import annotations
from dataclasses import dataclass
import torch
from torch import nn
from sibling import width

@dataclass
class Config:
    width: int

def build():
    torch.manual_seed(0)
    return nn.Linear(Config(width).width, 2)

def boom():
    raise ValueError("no weights here")

def not_a_model():
    return 42
"""


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "sibling.py").write_text("width = 3\n")
    (tmp_path / "net.py").write_text(GOOD)
    return tmp_path / "net.py"


def test_factory_may_use_dataclasses_and_import_its_siblings(project):
    model, task = load_factory(f"{project}:build")
    assert model.in_features == 3 and task is None
    source = get_source(model)
    assert source["kind"] == "factory" and len(source["sha256"]) == 64


def test_factory_errors_are_one_line_user_errors(project):
    with pytest.raises(CompactMLError, match="failed with ValueError: no weights here"):
        load_factory(f"{project}:boom")
    with pytest.raises(CompactMLError, match="returned int"):
        load_factory(f"{project}:not_a_model")
    with pytest.raises(CompactMLError, match="has no function 'nope'"):
        load_factory(f"{project}:nope")
    with pytest.raises(CompactMLError, match="not a factory reference"):
        load_factory(f"{project}:1bad")


def test_a_factory_source_is_only_run_when_trusted(project):
    model, _ = load_factory(f"{project}:build")
    source = get_source(model)
    with pytest.raises(CompactMLError, match="would run that file"):
        build_base(source)
    rebuilt = build_base(source, trust_factory=True)
    assert torch.equal(rebuilt.weight, model.weight)


def test_a_changed_factory_file_is_refused_even_when_trusted(project):
    source = get_source(load_factory(f"{project}:build")[0])
    project.write_text(GOOD + "\n# edited\n")
    with pytest.raises(CompactMLError, match="changed since the artifact was written"):
        build_base(source, trust_factory=True)


def test_resolve_names_what_it_accepts(tmp_path):
    with pytest.raises(CompactMLError, match="digits-cnn"):
        resolve("no-such-model")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CompactMLError, match="cannot read"):
        resolve(str(tmp_path / "notes.txt"))
