import pytest

from compactml.errors import CompactMLError
from compactml.io import atomic_write_bytes, atomic_writer, refuse_overwrite


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"original")
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as handle:
            handle.write(b"half")
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_refuse_overwrite_detects_the_same_file_by_another_name(tmp_path):
    path = tmp_path / "model.cml"
    path.write_bytes(b"x")
    with pytest.raises(CompactMLError, match="is the input file"):
        refuse_overwrite(tmp_path / "sub" / ".." / "model.cml", path)
    refuse_overwrite(tmp_path / "other.cml", path)


def test_permissions_are_readable_by_default_and_settable(tmp_path):
    public = atomic_write_bytes(tmp_path / "report.json", b"{}")
    secret = atomic_write_bytes(tmp_path / "key.pem", b"k", permissions=0o600)
    assert public.stat().st_mode & 0o777 == 0o644
    assert secret.stat().st_mode & 0o777 == 0o600
