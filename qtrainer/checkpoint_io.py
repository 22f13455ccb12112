"""Checkpoint files: written atomically, verified on read.

A checkpoint file is a short header (magic, payload length, SHA-256 of the payload) followed by a
pickled dict of plain Python and numpy data. A crash while writing leaves the previous file
untouched (the payload goes to a temporary file that is fsync'ed, then renamed over the target);
a truncated, corrupted or foreign file is refused with the file named. Like ``paddle.load`` and
``torch.load``, reading unpickles: load only checkpoints you trust.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import struct
import tempfile
from typing import Any

__all__ = ["save_checkpoint_file", "load_checkpoint_file", "CheckpointError", "FORMAT_VERSION"]

MAGIC = b"QTRAINER-CKPT\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<Q32s")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupted or not ours."""


def save_checkpoint_file(checkpoint: dict[str, Any], path: str) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temp file, flush, fsync, rename)."""
    payload = pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL)
    header = MAGIC + _HEADER.pack(len(payload), hashlib.sha256(payload).digest())
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".ckpt")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(header)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint_file(path: str) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint_file`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as handle:
        data = handle.read()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path!r} is not a qtrainer checkpoint (no qtrainer header)")
    start = len(MAGIC) + _HEADER.size
    if len(data) < start:
        raise CheckpointError(f"checkpoint {path!r} is truncated (header incomplete)")
    length, digest = _HEADER.unpack(data[len(MAGIC):start])
    payload = data[start:]
    if len(payload) != length:
        raise CheckpointError(f"checkpoint {path!r} is truncated: {len(payload)} of {length} payload bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path!r} is corrupted (checksum mismatch)")
    checkpoint = pickle.loads(payload)
    if not isinstance(checkpoint, dict) or checkpoint.get("qtrainer_checkpoint") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} is not a qtrainer checkpoint of format {FORMAT_VERSION}")
    return checkpoint
