"""The README's Python tour runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_first_tour_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["p"].stored_bytes > 0
    assert namespace["m"]["top1"] >= 0.97
    assert (tmp_path / "out" / "digits.cml").is_file()
    assert namespace["same"] is not None


def test_the_compression_tour_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = python_blocks()
    exec(compile(blocks[0] + blocks[1], "README.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "out" / "digits-int4.onnx").is_file()
    for name in ("q4", "qat", "mp"):
        top1 = namespace["cml"].evaluate(namespace[name], namespace["task"])["top1"]
        assert top1 >= 0.95, name
