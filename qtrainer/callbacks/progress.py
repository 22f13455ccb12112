"""``TQDMProgressBar``: tqdm progress bars for training, validation, test and predict."""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Mapping

from tqdm import tqdm

from qtrainer.callbacks.base import Callback

__all__ = ["TQDMProgressBar"]


class TQDMProgressBar(Callback):
    """Show tqdm bars on ``sys.stderr``: one per training epoch, plus validation, test and predict.

    The training bar's description holds the epoch; its postfix holds ``trainer.progress_bar_metrics``
    (the running train ``loss`` and everything logged with ``prog_bar=True``), read when tqdm draws
    the bar (at most every 0.1 s, its ``mininterval``) rather than formatted on every batch; tqdm
    shows the rate and the ETA. Only rank 0 draws; nothing is drawn with ``refresh_rate=0``. Bars
    are closed when a stage ends, on an exception and at teardown.

    Args:
        refresh_rate: redraw every this many batches (0 disables the bars).
        leave: keep each finished epoch's bar on screen (else one training bar is reused).
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ValueError(f"TQDMProgressBar(refresh_rate={refresh_rate!r}): must be an int >= 0 (0 disables)")
        self.refresh_rate = refresh_rate
        self.leave = leave
        self.train_bar: tqdm | None = None
        self.val_bar: tqdm | None = None
        self.test_bar: tqdm | None = None
        self.predict_bar: tqdm | None = None

    @property
    def is_enabled(self) -> bool:
        return self.refresh_rate > 0

    def _active(self, trainer) -> bool:
        return self.is_enabled and bool(trainer.is_global_zero)

    def _new_bar(self, desc: str, total: Any, leave: bool,
                 metrics: Callable[[], Mapping[str, Any]] | None = None) -> tqdm:
        return _Bar(
            desc=desc,
            total=_as_total(total),
            leave=leave,
            file=sys.stderr,
            dynamic_ncols=True,
            unit="it",
            metrics=metrics,
        )

    def _advance(self, bar: tqdm | None, done: int) -> None:
        """Move ``bar`` to ``done`` batches every ``refresh_rate`` batches and at the end (tqdm
        redraws it when its ``mininterval`` has passed)."""
        if bar is None:
            return
        if done % self.refresh_rate != 0 and done != bar.total:
            return
        bar.update(done - bar.n)

    # -- training ------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer, module) -> None:
        if not self._active(trainer):
            return
        desc = f"Epoch {trainer.current_epoch}"
        if self.train_bar is not None and not self.leave:
            self.train_bar.set_description(desc, refresh=False)
            self.train_bar.reset(total=_as_total(trainer.num_training_batches))
            return
        _close(self.train_bar)
        self.train_bar = self._new_bar(desc, trainer.num_training_batches, leave=True,
                                       metrics=lambda: trainer.progress_bar_metrics)

    def on_train_batch_end(self, trainer, module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._advance(self.train_bar, batch_idx + 1)

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.train_bar is not None:
            self.train_bar.refresh()

    def on_train_end(self, trainer, module) -> None:
        self.train_bar = _close(self.train_bar)

    # -- validation ----------------------------------------------------------------------
    def on_validation_start(self, trainer, module) -> None:
        if not self._active(trainer):
            return
        total = trainer.num_val_batches
        sanity_steps = getattr(trainer, "num_sanity_val_steps", None)
        if trainer.sanity_checking and isinstance(sanity_steps, int) and sanity_steps >= 0:
            total = min(_as_total(total) or sanity_steps, sanity_steps)
        desc = "Sanity Checking" if trainer.sanity_checking else "Validation"
        _close(self.val_bar)
        self.val_bar = self._new_bar(desc, total, leave=trainer.state_stage != "fit")

    def on_validation_batch_end(self, trainer, module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._advance(self.val_bar, batch_idx + 1)

    def on_validation_end(self, trainer, module) -> None:
        self.val_bar = _close(self.val_bar)
        if self.train_bar is not None and not trainer.sanity_checking:
            self.train_bar.refresh()

    # -- test and predict ----------------------------------------------------------------
    def on_test_start(self, trainer, module) -> None:
        if self._active(trainer):
            _close(self.test_bar)
            self.test_bar = self._new_bar("Testing", trainer.num_test_batches, leave=True)

    def on_test_batch_end(self, trainer, module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._advance(self.test_bar, batch_idx + 1)

    def on_test_end(self, trainer, module) -> None:
        self.test_bar = _close(self.test_bar)

    def on_predict_start(self, trainer, module) -> None:
        if self._active(trainer):
            _close(self.predict_bar)
            self.predict_bar = self._new_bar("Predicting", trainer.num_predict_batches, leave=True)

    def on_predict_batch_end(self, trainer, module, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._advance(self.predict_bar, batch_idx + 1)

    def on_predict_end(self, trainer, module) -> None:
        self.predict_bar = _close(self.predict_bar)

    # -- always close ----------------------------------------------------------------------
    def on_exception(self, trainer, module, exception: BaseException) -> None:
        self._close_all()

    def teardown(self, trainer, module, stage: str) -> None:
        self._close_all()

    def _close_all(self) -> None:
        self.train_bar = _close(self.train_bar)
        self.val_bar = _close(self.val_bar)
        self.test_bar = _close(self.test_bar)
        self.predict_bar = _close(self.predict_bar)


class _Bar(tqdm):
    """A tqdm bar whose postfix is ``metrics()``, read only when the bar is drawn (after the
    first draw, which shows no postfix yet)."""

    _metrics: Callable[[], Mapping[str, Any]] | None = None

    def __init__(self, *args: Any, metrics: Callable[[], Mapping[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics = metrics

    @property
    def format_dict(self) -> dict[str, Any]:
        if self._metrics is not None:
            self.set_postfix(_postfix(self._metrics()), refresh=False)
        return super().format_dict


def _close(bar: tqdm | None) -> None:
    if bar is not None:
        bar.close()
    return None


def _as_total(total: Any) -> int | None:
    """A tqdm total: a non-negative int, or None when the length is unknown or infinite."""
    if total is None or isinstance(total, bool):
        return None
    if isinstance(total, float):
        return int(total) if math.isfinite(total) else None
    return int(total) if total >= 0 else None


def _postfix(metrics: dict[str, Any]) -> dict[str, Any]:
    """Postfix with ``loss`` first, then the other metrics in logging order."""
    items = dict(metrics)
    ordered = {"loss": items.pop("loss")} if "loss" in items else {}
    ordered.update(items)
    return ordered
