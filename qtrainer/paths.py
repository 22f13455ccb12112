"""Small path helpers shared by the Trainer and the loggers."""
from __future__ import annotations

import os
import tempfile

__all__ = ["nearest_existing_ancestor", "check_writable_dir"]


def nearest_existing_ancestor(path: str) -> str:
    """``path`` itself if it exists, else its closest existing parent (what creating it would write into)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe


def check_writable_dir(path: str, name: str) -> None:
    """Raise ``ValueError`` naming argument ``name`` when ``path`` cannot be created or written
    (checked by creating a temporary file in its nearest existing ancestor, without creating ``path``)."""
    probe = nearest_existing_ancestor(path)
    if not os.path.isdir(probe):
        raise ValueError(f"{name}={path!r} cannot be created: {probe!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ValueError(f"{name}={path!r} is not writable ({probe!r}: {exc.strerror})") from exc
