"""Small path helpers shared by the Trainer and the loggers."""
from __future__ import annotations

import os

__all__ = ["nearest_existing_ancestor"]


def nearest_existing_ancestor(path: str) -> str:
    """``path`` itself if it exists, else its closest existing parent (what creating it would write into)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe
