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
from typing import Any

from qtrainer._io import atomic_open

__all__ = ["save_checkpoint_file", "load_checkpoint_file", "CheckpointError", "FORMAT_VERSION", "READABLE_FORMATS"]

MAGIC = b"QTRAINER-CKPT\n"
# 2: the data seed and running loss moved into "trainer_state" (qtrainer.state.TrainerState);
# format-1 files are upgraded on load by qtrainer.checkpointing.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
_HEADER = struct.Struct("<Q32s")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, truncated, corrupted or not ours."""


def save_checkpoint_file(checkpoint: dict[str, Any], path: str) -> None:
    """Write ``checkpoint`` to ``path`` atomically (``qtrainer._io``: temp file, fsync, rename)."""
    payload = pickle.dumps(checkpoint, protocol=pickle.HIGHEST_PROTOCOL)
    header = MAGIC + _HEADER.pack(len(payload), hashlib.sha256(payload).digest())
    with atomic_open(path, "wb") as handle:
        handle.write(header)
        handle.write(payload)


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
    if not isinstance(checkpoint, dict) or checkpoint.get("qtrainer_checkpoint") not in READABLE_FORMATS:
        found = checkpoint.get("qtrainer_checkpoint") if isinstance(checkpoint, dict) else None
        raise CheckpointError(f"{path!r} is a qtrainer checkpoint of format {found!r}; this qtrainer reads "
                              f"formats {list(READABLE_FORMATS)}")
    return checkpoint
