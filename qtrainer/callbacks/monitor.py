"""``MonitorCallback``: the shared base of callbacks that watch one logged metric.

``ModelCheckpoint`` and ``EarlyStopping`` both ask "is this value better than the best so far?";
the answer (``mode``, ``min_delta``, non-finite values) lives here once.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from qtrainer.callbacks.base import Callback

__all__ = ["MonitorCallback", "fit_has_validation", "missing_metric_error"]

_MODES = ("min", "max")


class MonitorCallback(Callback):
    """Base class for a callback that watches the logged metric ``monitor``.

    Args:
        monitor: name of the metric in ``trainer.callback_metrics`` (as given to ``self.log``).
        mode: ``"min"`` when lower is better (losses), ``"max"`` when higher is better (accuracy).
        min_delta: how much a value must beat the best one to count as an improvement (>= 0).
    """

    def __init__(self, monitor: str | None, mode: str = "min", min_delta: float = 0.0) -> None:
        name = type(self).__name__
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"{name}(monitor={monitor!r}): monitor must be a metric name (str) or None")
        if mode not in _MODES:
            raise ValueError(f"{name}(mode={mode!r}): mode must be one of {list(_MODES)}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)):
            raise TypeError(f"{name}(min_delta={min_delta!r}): min_delta must be a number")
        if not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"{name}(min_delta={min_delta!r}): min_delta must be finite and >= 0")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = float(min_delta)

    # -- comparisons ---------------------------------------------------------------------
    @property
    def worst_score(self) -> float:
        """The score every finite value improves on (``inf`` for min, ``-inf`` for max)."""
        return math.inf if self.mode == "min" else -math.inf

    def _is_better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b`` in this mode (no ``min_delta``)."""
        return a < b if self.mode == "min" else a > b

    def _is_improvement(self, current: float, best: float | None) -> bool:
        """True when ``current`` beats ``best`` by more than ``min_delta``.

        A non-finite ``current`` is never an improvement; ``best=None`` means "no best yet".
        """
        if not math.isfinite(current):
            return False
        if best is None:
            return True
        if self.mode == "min":
            return current < best - self.min_delta
        return current > best + self.min_delta

    # -- reading the metric --------------------------------------------------------------
    def _get_monitor_value(self, trainer) -> float | None:
        """The latest value of ``monitor`` as a float, or None when it has not been logged."""
        value = trainer.callback_metrics.get(self.monitor)
        return None if value is None else float(value)

    def _missing_metric_error(self, trainer, names: list[str] | None = None) -> ValueError:
        """An error saying which metric(s) are missing and which ones are logged."""
        return missing_metric_error(type(self).__name__, names or [self.monitor], trainer.callback_metrics)

    def _describe(self) -> str:
        return f"{type(self).__name__}(monitor={self.monitor!r}, mode={self.mode!r})"


def fit_has_validation(trainer) -> bool:
    """True when this fit runs validation (a validation loader with at least one batch)."""
    return getattr(trainer, "val_dataloaders", None) is not None and bool(getattr(trainer, "num_val_batches", 1))


def missing_metric_error(owner: str, missing: list[str], metrics: Mapping[str, Any]) -> ValueError:
    """``ValueError`` naming the missing metric(s), where they were asked for, and the logged ones."""
    logged = sorted(metrics)
    listed = ", ".join(repr(m) for m in logged) if logged else "none (nothing has been logged yet)"
    what = ", ".join(repr(m) for m in missing)
    return ValueError(
        f"{owner} watches metric {what}, which was never logged. Logged metrics: {listed}. "
        f"Log it with self.log({missing[0]!r}, value) in the module, or monitor one of the logged ones."
    )
