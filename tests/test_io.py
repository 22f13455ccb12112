"""qtrainer/_io.py: the one atomic writer leaves the old file or the new one, never half of one."""
from __future__ import annotations

import os

import pytest

from qtrainer._io import atomic_open, atomic_write_bytes, atomic_write_text


def test_writes_create_parents_and_leave_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b.txt"
    atomic_write_text(str(path), "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["b.txt"]


def test_a_failure_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.txt"
    atomic_write_text(str(path), "old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_open(str(path), "w") as handle:
            handle.write("new, half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]


def test_an_os_error_names_the_owner_and_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=rf"CSVLogger cannot write '{blocker}/x.csv'"):
        atomic_write_text(str(blocker / "x.csv"), "a", "CSVLogger")


def test_files_get_the_mode_open_would_give(tmp_path):
    path = tmp_path / "m.txt"
    atomic_write_text(str(path), "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_only_binary_and_text_modes(tmp_path):
    with pytest.raises(ValueError, match=r"mode must be 'wb' or 'w', got 'a'"):
        with atomic_open(str(tmp_path / "x"), "a"):
            pass
