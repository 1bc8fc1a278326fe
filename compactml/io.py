"""Atomic file output: a reader never sees a half-written file, and a crash loses nothing.

Everything compactml writes (artifacts, reports, cached weights, keys) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from compactml.errors import CompactMLError


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two paths name the same file (after resolving links and relative parts)."""
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def refuse_overwrite(output: str | os.PathLike, input_path: str | os.PathLike | None) -> None:
    """Raise when ``output`` would replace ``input_path``: the user's input is never overwritten."""
    if input_path is not None and same_file(output, input_path):
        raise CompactMLError(
            f"output path {output} is the input file; choose a different output path (-o)"
        )


@contextlib.contextmanager
def atomic_writer(
    path: str | os.PathLike, mode: str = "wb", permissions: int | None = None
) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it into place.

    On any exception the temporary file is removed and ``path`` is left as it was. The file
    gets ``permissions`` if given, else those of the file it replaces, else 0o644 (a temporary
    file alone would be readable by its owner only).
    """
    path = Path(path)
    if path.exists() and path.is_dir():
        raise CompactMLError(f"output path {path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    if permissions is None:
        permissions = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, permissions)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, permissions: int | None = None
) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_writer``) and return the path."""
    with atomic_writer(path, "wb", permissions) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
