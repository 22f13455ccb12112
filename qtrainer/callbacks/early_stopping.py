"""``EarlyStopping``: stop fitting when a monitored metric stops improving."""
from __future__ import annotations

import logging
import math
from typing import Any

from qtrainer.callbacks.monitor import MonitorCallback, fit_has_validation

__all__ = ["EarlyStopping"]

logger = logging.getLogger(__name__)


class EarlyStopping(MonitorCallback):
    """Ask the Trainer to stop when ``monitor`` has not improved for ``patience`` checks.

    When it acts: after every validation run during fit (``on_validation_end``, never during the
    sanity check) when the fit has validation batches, otherwise at the end of every training epoch.
    Stopping sets ``trainer.should_stop``; the Trainer finishes the current epoch and stops.
    The reason is logged and kept in ``stop_reason``.

    Args:
        monitor: metric to watch (a name given to ``self.log``).
        min_delta: an improvement must beat the best value by more than this (>= 0).
        patience: number of checks without improvement after which training stops.
        verbose: log every improvement, not only the stop.
        mode: ``"min"`` or ``"max"``: which direction is an improvement.
        strict: raise when ``monitor`` is not among the logged metrics (else warn and skip).
        check_finite: stop as soon as the metric is NaN or infinite.
        stopping_threshold: stop as soon as the metric is better than this value.
        divergence_threshold: stop as soon as the metric is worse than this value.
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"EarlyStopping(monitor={monitor!r}): monitor must be a metric name (non-empty str)")
        super().__init__(monitor=monitor, mode=mode, min_delta=min_delta)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping(patience={patience!r}): patience must be an int >= 0")
        for arg, value in (("stopping_threshold", stopping_threshold), ("divergence_threshold", divergence_threshold)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise TypeError(f"EarlyStopping({arg}={value!r}): must be a number or None")
        self.patience = patience
        self.verbose = verbose
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold

        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score: float | None = None
        self.stop_reason: str | None = None
        self._warned_missing = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "wait_count": self.wait_count,
            "stopped_epoch": self.stopped_epoch,
            "best_score": self.best_score,
            "patience": self.patience,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = state_dict["wait_count"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.best_score = state_dict["best_score"]
        self.patience = state_dict.get("patience", self.patience)
        self.stop_reason = state_dict.get("stop_reason")

    # -- hooks ---------------------------------------------------------------------------
    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or trainer.state_stage != "fit":
            return
        self._check(trainer)

    def on_train_epoch_end(self, trainer, module) -> None:
        if fit_has_validation(trainer):
            return  # checked after validation instead
        self._check(trainer)

    # -- logic ---------------------------------------------------------------------------
    def _check(self, trainer) -> None:
        current = self._get_monitor_value(trainer)
        if current is None:
            if self.strict:
                raise self._missing_metric_error(trainer)
            if not self._warned_missing:
                self._warned_missing = True
                logger.warning("%s: metric %r not logged; early stopping is skipped", self._describe(), self.monitor)
            return
        should_stop, reason = self._evaluate(current)
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stop_reason = reason
            trainer.should_stop = True
            if trainer.is_global_zero:
                logger.info("EarlyStopping at epoch %d: %s", trainer.current_epoch, reason)
        elif reason and self.verbose and trainer.is_global_zero:
            logger.info("%s", reason)

    def _evaluate(self, current: float) -> tuple[bool, str | None]:
        """Decide whether to stop on ``current``; returns (stop?, message) and updates the counters."""
        name = self.monitor
        if self.check_finite and not math.isfinite(current):
            return True, (
                f"metric {name} = {current} is not finite; best value so far was {self.best_score}. "
                "Signalling the Trainer to stop."
            )
        if self.stopping_threshold is not None and self._is_better_or_equal(current, self.stopping_threshold):
            return True, (
                f"stopping threshold reached: {name} = {current} "
                f"{'<=' if self.mode == 'min' else '>='} {self.stopping_threshold}."
            )
        if self.divergence_threshold is not None and self._is_better(self.divergence_threshold, current):
            return True, (
                f"divergence threshold reached: {name} = {current} "
                f"{'>' if self.mode == 'min' else '<'} {self.divergence_threshold}."
            )
        if self._is_improvement(current, self.best_score):
            message = (
                f"metric {name} improved to {current:.6g}"
                if self.best_score is None
                else f"metric {name} improved by {abs(self.best_score - current):.6g} to {current:.6g}"
            )
            self.best_score = current
            self.wait_count = 0
            return False, message
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (
                f"metric {name} did not improve in the last {self.wait_count} checks; "
                f"best value: {self.best_score}. Signalling the Trainer to stop."
            )
        return False, None

    def _is_better_or_equal(self, a: float, b: float) -> bool:
        return a <= b if self.mode == "min" else a >= b
