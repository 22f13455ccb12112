import os

import numpy as np
import pytest

from qtrainer.checkpoint_io import FORMAT_VERSION, CheckpointError, load_checkpoint_file, save_checkpoint_file


def _ckpt(value=1.0):
    return {"qtrainer_checkpoint": FORMAT_VERSION, "w": np.full(3, value)}


def test_round_trip(tmp_path):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint_file(_ckpt(2.0), path)
    np.testing.assert_array_equal(load_checkpoint_file(path)["w"], np.full(3, 2.0))
    assert [f for f in os.listdir(tmp_path)] == ["a.ckpt"]  # no temporary file left


def test_truncated_file_is_refused_by_name(tmp_path):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint_file(_ckpt(), path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    with pytest.raises(CheckpointError, match="a.ckpt.*truncated"):
        load_checkpoint_file(path)


def test_corrupted_file_is_refused(tmp_path):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint_file(_ckpt(), path)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint_file(path)


def test_foreign_and_missing_files(tmp_path):
    path = tmp_path / "other.pdparams"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a qtrainer checkpoint"):
        load_checkpoint_file(str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(str(tmp_path / "missing.ckpt"))


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "a.ckpt")
    save_checkpoint_file(_ckpt(1.0), path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_file(_ckpt(5.0), path)
    monkeypatch.undo()
    np.testing.assert_array_equal(load_checkpoint_file(path)["w"], np.full(3, 1.0))
    assert os.listdir(tmp_path) == ["a.ckpt"]
