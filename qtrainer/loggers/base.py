"""The ``Logger`` base class the Trainer and callbacks write through."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["Logger"]


class Logger:
    """Base class for experiment loggers.

    The Trainer calls ``log_metrics`` with plain floats, ``log_hyperparams`` once per fit, and
    ``finalize`` at the end of every run (``status`` is ``"success"``, ``"failed"`` or
    ``"interrupted"``). ``log_histogram``, ``log_histogram_raw``, ``log_image`` and ``log_layout``
    are optional: loggers that cannot draw histograms, images or chart layouts ignore them.
    Only rank 0 writes; the Trainer does not call loggers on other ranks.
    """

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def version(self) -> int | str:
        return 0

    @property
    def log_dir(self) -> str | None:
        """Directory this logger writes to (None when it writes nowhere on disk)."""
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_hyperparams(self, params: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        pass

    def log_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        pass

    def log_histogram_raw(self, tag: str, bin_edges: np.ndarray, counts: np.ndarray, step: int) -> None:
        """An already-binned histogram: ``counts[i]`` values in ``[bin_edges[i], bin_edges[i + 1])``.

        Optional, like ``log_histogram`` (used for histograms kept as counts, e.g. PTQ activation
        histograms, whose values are not stored).
        """

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An ``HxWx3`` (or ``HxWx1`` / ``HxWx4``) uint8 picture. Optional, like ``log_histogram``."""

    def log_layout(self, layout: Mapping[str, Mapping[str, list]]) -> None:
        """How to arrange scalars into charts: ``{category: {title: ["Multiline", [tag_regex, ...]]}}``
        (or ``["Margin", [value, lower, upper]]``), TensorBoard's custom-scalars layout. Optional;
        a later call replaces the layout of the run.
        """

    def save(self) -> None:
        pass

    def finalize(self, status: str) -> None:
        self.save()
