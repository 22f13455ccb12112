"""``ModelCheckpoint``: save checkpoints during fit, keeping the best ``save_top_k`` of them."""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any

from qtrainer.callbacks.monitor import MonitorCallback, fit_has_validation, missing_metric_error

__all__ = ["ModelCheckpoint"]

logger = logging.getLogger(__name__)

_FILE_EXT = ".ckpt"
_NAME_LAST = "last"
_DEFAULT_FILENAME = "{epoch}-{step}"
_FIELD = re.compile(r"\{([^{}:!]+)([^{}]*)\}")  # {name[:format]} in a filename template


class ModelCheckpoint(MonitorCallback):
    """Save a checkpoint every ``every_n_epochs`` epochs or every ``every_n_train_steps`` steps.

    When it acts: in the two checkpoint hooks (``qtrainer/hooks.py``), ``on_epoch_checkpoint``
    after each training epoch (after validation and every ``on_train_epoch_end`` hook) and
    ``on_step_checkpoint`` after each optimizer step; each decides from the ``every_n_*`` settings
    whether to save. With neither set, it saves after every epoch. It never saves during the
    sanity check.

    Args:
        dirpath: directory of the checkpoints; default ``<trainer.log_dir>/checkpoints``.
        filename: template such as ``"{epoch}-{val_loss:.2f}"`` filled from ``epoch``, ``step`` and
            the logged metrics; with ``auto_insert_metric_name`` it becomes
            ``"epoch=3-val_loss=0.12.ckpt"``. Default: ``"epoch={epoch}-step={step}"``.
        monitor: metric that ranks checkpoints; None ranks by recency (the newest is "best").
        mode: ``"min"`` or ``"max"``: which values of ``monitor`` are better.
        save_top_k: how many checkpoints to keep: ``-1`` all, ``0`` none, ``k`` the best k. Files
            this callback wrote that fall out of the top k are removed.
        save_last: also write ``last.ckpt`` on every save and at the end of every epoch.
        every_n_epochs: save every n epochs (0 disables epoch saves).
        every_n_train_steps: save every n optimizer steps (0 disables step saves).
        auto_insert_metric_name: write ``name=value`` for each template field instead of ``value``.
        verbose: log each save.

    A monitored value that is not finite never enters the top k. A checkpoint whose name is
    already taken on disk by another file gets a ``-v1``, ``-v2``... suffix instead of overwriting it.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool | None = None,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        auto_insert_metric_name: bool = True,
        verbose: bool = False,
    ) -> None:
        super().__init__(monitor=monitor, mode=mode)
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int):
            raise TypeError(f"ModelCheckpoint(save_top_k={save_top_k!r}): save_top_k must be an int")
        if save_top_k < -1:
            raise ValueError(
                f"ModelCheckpoint(save_top_k={save_top_k}): use -1 (keep all), 0 (keep none) or k >= 1"
            )
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ValueError(
                f"ModelCheckpoint(save_top_k={save_top_k}, monitor=None): without a monitored metric "
                "there is nothing to rank; use save_top_k in [-1, 0, 1] or set monitor"
            )
        for arg, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"ModelCheckpoint({arg}={value!r}): must be None or an int >= 0")
        if every_n_epochs and every_n_train_steps:
            raise ValueError(
                f"ModelCheckpoint(every_n_epochs={every_n_epochs}, every_n_train_steps={every_n_train_steps}): "
                "set only one of them"
            )
        if filename is not None and not isinstance(filename, str):
            raise TypeError(f"ModelCheckpoint(filename={filename!r}): filename must be a str template")
        if every_n_epochs is None and every_n_train_steps is None:
            every_n_epochs = 1
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.filename = filename
        self.save_top_k = save_top_k
        self.save_last = bool(save_last)
        self.every_n_epochs = every_n_epochs or 0
        self.every_n_train_steps = every_n_train_steps or 0
        self.auto_insert_metric_name = auto_insert_metric_name
        self.verbose = verbose

        self.best_k_models: dict[str, float] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.kth_best_model_path = ""
        self.kth_value: float | None = None
        self.last_model_path = ""
        self.current_score: float | None = None
        self._last_step_saved = -1
        self._validation_has_run = False
        self._warned_missing = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor,
            mode=self.mode,
            every_n_epochs=self.every_n_epochs,
            every_n_train_steps=self.every_n_train_steps,
        )

    # -- hooks ---------------------------------------------------------------------------
    def setup(self, trainer, module, stage: str) -> None:
        if self.dirpath is None:
            root = trainer.log_dir or trainer.default_root_dir
            self.dirpath = os.path.join(root, "checkpoints")
        self._validation_has_run = False
        self._warned_missing = False
        self._last_step_saved = -1

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking and trainer.state_stage == "fit":
            self._validation_has_run = True

    def on_epoch_checkpoint(self, trainer, module) -> None:
        """Saves when ``every_n_epochs`` says so (and ``last.ckpt`` with ``save_last``)."""
        if trainer.sanity_checking:
            return
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, at_epoch_end=True)
        self._save_last_checkpoint(trainer)

    def on_step_checkpoint(self, trainer, module) -> None:
        """Saves when ``every_n_train_steps`` says so."""
        if trainer.sanity_checking or not self.every_n_train_steps:
            return
        step = trainer.global_step
        if step == self._last_step_saved or step % self.every_n_train_steps != 0:
            return
        self._last_step_saved = step
        self._save_topk_checkpoint(trainer, at_epoch_end=False)
        self._save_last_checkpoint(trainer)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "dirpath": self.dirpath,
            "best_model_path": self.best_model_path,
            "best_model_score": self.best_model_score,
            "current_score": self.current_score,
            "best_k_models": dict(self.best_k_models),
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath")
        self.best_model_path = state_dict.get("best_model_path", "")
        self.best_model_score = state_dict.get("best_model_score")
        if saved_dir is None or self.dirpath is None or _same_dir(saved_dir, self.dirpath):
            self.current_score = state_dict.get("current_score")
            self.best_k_models = dict(state_dict.get("best_k_models", {}))
            self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
            self.kth_value = state_dict.get("kth_value")
            self.last_model_path = state_dict.get("last_model_path", "")
        else:
            logger.warning(
                "ModelCheckpoint: the checkpoint directory changed from %s to %s; only best_model_path "
                "and best_model_score are restored, the top-k bookkeeping starts afresh",
                saved_dir,
                self.dirpath,
            )

    # -- names ---------------------------------------------------------------------------
    def format_checkpoint_name(
        self, metrics: dict[str, Any], name: str | None = None, version: int | None = None
    ) -> str:
        """The checkpoint path for ``metrics`` (which holds ``epoch``, ``step`` and logged metrics)."""
        if name is None:
            template = self.filename or _DEFAULT_FILENAME
            auto_insert = self.auto_insert_metric_name or self.filename is None
            name = _fill_template(template, metrics, auto_insert)
        if version is not None:
            name = f"{name}-v{version}"
        return os.path.join(self.dirpath or "", name + _FILE_EXT)

    def _template_fields(self) -> list[str]:
        return [m.group(1) for m in _FIELD.finditer(self.filename or _DEFAULT_FILENAME)]

    def _free_path(self, metrics: dict[str, Any], name: str | None, replacing: str) -> str:
        """A path for this save that does not overwrite a file other than ``replacing``."""
        path = self.format_checkpoint_name(metrics, name)
        version = 1
        while os.path.exists(path) and path != replacing:
            path = self.format_checkpoint_name(metrics, name, version)
            version += 1
        return path

    # -- saving --------------------------------------------------------------------------
    def _candidates(self, trainer) -> dict[str, Any]:
        metrics: dict[str, Any] = dict(trainer.callback_metrics)
        metrics["epoch"] = trainer.current_epoch
        metrics["step"] = trainer.global_step
        return metrics

    def _save_topk_checkpoint(self, trainer, at_epoch_end: bool) -> None:
        if self.save_top_k == 0:
            return
        metrics = self._candidates(trainer)
        needed = ([self.monitor] if self.monitor else []) + self._template_fields()
        missing = [n for n in dict.fromkeys(needed) if n not in metrics]
        if missing:
            if self._validation_has_run or (at_epoch_end and not fit_has_validation(trainer)):
                raise missing_metric_error(self._describe(), missing, trainer.callback_metrics)
            if not self._warned_missing:
                self._warned_missing = True
                logger.warning(
                    "%s: %s not logged yet (logged: %s); skipping this save until it is",
                    self._describe(), missing, sorted(trainer.callback_metrics),
                )
            return
        if self.monitor is None:
            self._save_by_recency(trainer, metrics)
            return
        current = float(metrics[self.monitor])
        self.current_score = current
        if not math.isfinite(current):
            logger.warning("%s: monitored value %s is not finite; no top-k checkpoint saved", self._describe(), current)
            return
        if self._enters_top_k(current):
            self._update_best_and_save(trainer, current, metrics)
        elif self.verbose and trainer.is_global_zero:
            logger.info(
                "Epoch %d, step %d: %r = %s was not in the top %d",
                trainer.current_epoch, trainer.global_step, self.monitor, current, self.save_top_k,
            )

    def _enters_top_k(self, current: float) -> bool:
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        return self.kth_value is None or self._is_better(current, self.kth_value)

    def _update_best_and_save(self, trainer, current: float, metrics: dict[str, Any]) -> None:
        full = self.save_top_k != -1 and len(self.best_k_models) >= self.save_top_k
        dropped = ""
        if full:
            dropped = self.kth_best_model_path
            self.best_k_models.pop(dropped, None)
        path = self._free_path(metrics, None, replacing=dropped)
        self.best_k_models[path] = current
        if self.save_top_k == -1 or len(self.best_k_models) >= self.save_top_k:
            pick_worst = max if self.mode == "min" else min
            self.kth_best_model_path = pick_worst(self.best_k_models, key=self.best_k_models.get)
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        pick_best = min if self.mode == "min" else max
        self.best_model_path = pick_best(self.best_k_models, key=self.best_k_models.get)
        self.best_model_score = self.best_k_models[self.best_model_path]
        if self.verbose and trainer.is_global_zero:
            logger.info(
                "Epoch %d, step %d: %r reached %s (best %s), saving %s as top %d",
                trainer.current_epoch, trainer.global_step, self.monitor, current,
                self.best_model_score, path, self.save_top_k,
            )
        self._save(trainer, path)
        if dropped and dropped != path:
            self._remove(trainer, dropped)

    def _save_by_recency(self, trainer, metrics: dict[str, Any]) -> None:
        previous = self.best_model_path
        replacing = previous if self.save_top_k == 1 else ""
        path = self._free_path(metrics, None, replacing=replacing)
        self.best_model_path = path
        self._save(trainer, path)
        if self.save_top_k == 1 and previous and previous != path:
            self._remove(trainer, previous)
        if self.verbose and trainer.is_global_zero:
            logger.info("Epoch %d, step %d: saving %s", trainer.current_epoch, trainer.global_step, path)

    def _save_last_checkpoint(self, trainer) -> None:
        if not self.save_last:
            return
        path = self._free_path({}, _NAME_LAST, replacing=self.last_model_path)
        previous = self.last_model_path
        self.last_model_path = path
        self._save(trainer, path)
        if previous and previous != path:
            self._remove(trainer, previous)

    def _save(self, trainer, path: str) -> None:
        if trainer.is_global_zero:  # rank 0 writes the file; the other ranks touch no file system
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._last_step_saved = trainer.global_step
        trainer.save_checkpoint(path)  # every rank calls it and waits for rank 0's write

    def _remove(self, trainer, path: str) -> None:
        """Delete ``path`` unless some checkpoint callback of this trainer still refers to it."""
        if not trainer.is_global_zero or path in self._paths_in_use(trainer):
            return
        if os.path.isfile(path):
            os.remove(path)
            logger.debug("ModelCheckpoint removed %s", path)

    def _paths_in_use(self, trainer) -> set[str]:
        callbacks = list(getattr(trainer, "checkpoint_callbacks", None) or [])
        if self not in callbacks:
            callbacks.append(self)
        used: set[str] = set()
        for cb in callbacks:
            used.update(cb.best_k_models)
            used.update(p for p in (cb.best_model_path, cb.last_model_path) if p)
        return used


def _fill_template(template: str, metrics: dict[str, Any], auto_insert: bool) -> str:
    """Fill ``{name[:format]}`` fields from ``metrics`` (a ``/`` in an inserted name becomes ``_``)."""

    def fill(match: re.Match) -> str:
        key, spec = match.group(1), match.group(2)
        value = metrics[key]
        text = format(value, spec[1:]) if spec.startswith(":") else str(value)
        return f"{key.replace('/', '_')}={text}" if auto_insert else text

    return _FIELD.sub(fill, template)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))
