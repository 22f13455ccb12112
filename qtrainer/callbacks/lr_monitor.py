"""``LearningRateMonitor``: log each optimizer's learning rate (and optionally momentum)."""
from __future__ import annotations

from typing import Any

from qtrainer.callbacks.base import Callback

__all__ = ["LearningRateMonitor"]

_INTERVALS = (None, "step", "epoch")


class LearningRateMonitor(Callback):
    """Log the learning rate of every optimizer through the Trainer's loggers.

    The metric is named ``lr-<OptimizerClass>`` (``lr-<OptimizerClass>-1``, ``-2``... for further
    optimizers of the same class, or the ``"name"`` of the scheduler's config when given), and
    ``lr-<...>-momentum`` with ``log_momentum``.

    When it acts:
        - ``logging_interval="step"``: before each optimizer step (every ``trainer.log_every_n_steps``).
        - ``logging_interval="epoch"``: at the start of every training epoch.
        - ``None``: per step for optimizers whose scheduler steps per step, per epoch for the others.

    Args:
        logging_interval: ``None``, ``"step"`` or ``"epoch"``.
        log_momentum: also log the momentum (``momentum`` of Momentum/SGD-like optimizers,
            ``beta1`` of Adam-like ones).
    """

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False) -> None:
        if logging_interval not in _INTERVALS:
            raise ValueError(
                f"LearningRateMonitor(logging_interval={logging_interval!r}): use one of {list(_INTERVALS)}"
            )
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.lr_names: list[str] = []
        self._intervals: list[str] = []
        self._last_logged_step = -1

    # -- hooks ---------------------------------------------------------------------------
    def setup(self, trainer, module, stage: str) -> None:
        if stage == "fit" and not trainer.loggers:
            raise ValueError(
                "LearningRateMonitor needs a logger; Trainer(logger=False) was given. "
                "Pass a logger (e.g. TensorBoardLogger or CSVLogger) or remove LearningRateMonitor."
            )

    def on_train_start(self, trainer, module) -> None:
        self.lr_names = _optimizer_names(trainer)
        self._intervals = [self._interval_of(trainer, i) for i in range(len(trainer.optimizers))]
        self._last_logged_step = -1

    def on_train_epoch_start(self, trainer, module) -> None:
        stats = self._stats(trainer, "epoch")
        if stats:
            trainer.log_metrics(stats, step=trainer.global_step)

    def on_train_batch_start(self, trainer, module, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_logged_step:
            return  # an accumulation batch: the optimizer has not stepped since the last log
        self._last_logged_step = step
        if step % max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1)) != 0:
            return
        stats = self._stats(trainer, "step")
        if stats:
            trainer.log_metrics(stats, step=step)

    # -- helpers -------------------------------------------------------------------------
    def _interval_of(self, trainer, index: int) -> str:
        """When optimizer ``index`` is logged: the fixed interval, or its scheduler's one."""
        if self.logging_interval is not None:
            return self.logging_interval
        for config in trainer.lr_schedulers or []:
            if _scheduler_optimizer_index(trainer, config) == index:
                return config.get("interval", "epoch")
        return "epoch"

    def _stats(self, trainer, interval: str) -> dict[str, float]:
        if len(self.lr_names) != len(trainer.optimizers):  # optimizers created after on_train_start
            self.on_train_start(trainer, None)
        stats: dict[str, float] = {}
        for name, when, optimizer in zip(self.lr_names, self._intervals, trainer.optimizers):
            if when != interval:
                continue
            stats[name] = float(optimizer.get_lr())
            if self.log_momentum:
                momentum = _momentum(optimizer)
                if momentum is not None:
                    stats[f"{name}-momentum"] = momentum
        return stats


def _optimizer_names(trainer) -> list[str]:
    """``lr-<Class>`` per optimizer, suffixed ``-1``, ``-2``... for repeated classes."""
    custom = {}
    for config in trainer.lr_schedulers or []:
        index = _scheduler_optimizer_index(trainer, config)
        if config.get("name") and index is not None:
            custom[index] = str(config["name"])
    seen: dict[str, int] = {}
    names = []
    for i, optimizer in enumerate(trainer.optimizers):
        if i in custom:
            names.append(custom[i])
            continue
        base = f"lr-{type(optimizer).__name__}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.append(base if count == 0 else f"{base}-{count}")
    return names


def _scheduler_optimizer_index(trainer, config: dict) -> int | None:
    """Index of the optimizer driven by a scheduler config (by identity of the scheduler)."""
    scheduler = config.get("scheduler")
    for i, optimizer in enumerate(trainer.optimizers):
        if getattr(optimizer, "_learning_rate", None) is scheduler:
            return i
    return None


def _momentum(optimizer) -> float | None:
    for attr in ("_momentum", "_beta1"):
        value = getattr(optimizer, attr, None)
        if value is None:
            continue
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None
