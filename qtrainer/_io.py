"""The one atomic writer: files are never half-written, and a good file is never replaced by a bad one.

Every write goes to a temporary file in the target's directory, is flushed and fsync'ed, and is
renamed over the target (``os.replace``, atomic on POSIX); the directory is fsync'ed afterwards so
the rename survives a power cut. A failure at any point removes the temporary file and leaves the
target as it was. Used by checkpoints, loggers, exports, reports and the spawned ranks' results.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_open", "fsync_directory", "fsync_file"]


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", *, owner: str | None = None,
                encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path`` atomically.

    ``mode`` is ``"wb"`` or ``"w"`` (text, ``encoding`` default utf-8, no newline translation).
    Missing parent directories are created. ``owner`` (e.g. ``"CSVLogger"``) prefixes the message
    of an ``OSError``, so the user learns who could not write where.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())
        text = mode == "w"
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if text else None,
                       newline="" if text else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if owner is None:
            raise
        raise OSError(exc.errno, f"{owner} cannot write {path!r}: {exc.strerror}") from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    fsync_directory(directory)


def atomic_write_bytes(path: str, data: bytes, *, owner: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, directory fsync)."""
    with atomic_open(path, "wb", owner=owner) as handle:
        handle.write(data)


def atomic_write_text(path: str, text: str, owner: str | None = None, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (temp file, fsync, rename, directory fsync)."""
    with atomic_open(path, "w", owner=owner, encoding=encoding) as handle:
        handle.write(text)


def fsync_file(path: str) -> None:
    """Flush ``path``'s data to disk; errors (e.g. a file system without fsync) are ignored."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_directory(directory: str) -> None:
    """Make renames in ``directory`` durable; errors (e.g. no directory fsync) are ignored."""
    fsync_file(directory)


def _umask() -> int:
    """The process umask, read without changing it (mkstemp makes 0600 files; we want open()'s mode)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    return 0o022
