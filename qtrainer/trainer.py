"""The ``Trainer``: fit/validate/test/predict loops, hooks, checkpoints and loggers.

The order in which hooks fire is documented in ``qtrainer/hooks.py``. The Trainer knows nothing
about quantization; quantization callbacks use the ``configure_model`` hook, which runs before
the optimizer is built and before checkpoint weights are restored.
"""
from __future__ import annotations

import collections.abc
import contextlib
import logging
import math
import os
import tempfile
from collections import deque
from typing import Any, Callable, Iterable

import numpy as np
import paddle

from qtrainer import __version__
from qtrainer.callbacks.base import Callback
from qtrainer.checkpoint_io import FORMAT_VERSION, CheckpointError, load_checkpoint_file, save_checkpoint_file
from qtrainer.data.iteration import close_iterator as _close_iterator, guard_iterator
from qtrainer.device import default_num_threads, resolve_device, resolve_precision, set_num_threads
from qtrainer.distributed import agree_on_batches, resolve_strategy
from qtrainer.hooks import MODULE_HOOKS, overrides_hook
from qtrainer.loggers.base import Logger
from qtrainer.module import Module
from qtrainer.paths import nearest_existing_ancestor
from qtrainer.optim import load_portable_optimizer_state, parse_optimizers, portable_optimizer_state
from qtrainer.results import LoggedResults, to_float
from qtrainer.rng import capture_rng_state, restore_paddle_rng_state, seed_data_rngs, seed_everything
from qtrainer.strategy import SingleProcess

__all__ = ["Trainer"]

log = logging.getLogger(__name__)

_RUNNING_LOSS_WINDOW = 20


def _check_positive_int(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: use a positive integer" + (" or None" if allow_none else ""))


def _check_limit(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: use an int (number of batches) or a float fraction in [0, 1]")
    if isinstance(value, float) and not 0.0 <= value <= 1.0 or isinstance(value, int) and value < 0:
        raise ValueError(f"{name}={value!r}: use an int >= 0 (number of batches) or a float fraction in [0, 1]")


def _check_writable_dir(path: str) -> None:
    """Raise a clear error when ``path`` cannot be created or written (checked without writing it)."""
    probe = nearest_existing_ancestor(path)
    if not os.path.isdir(probe):
        raise ValueError(f"default_root_dir={path!r} cannot be created: {probe!r} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ValueError(f"default_root_dir={path!r} is not writable ({probe!r}: {exc.strerror})") from exc


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else 1


def _loader_length(loader: Iterable) -> float:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return math.inf


class Trainer:
    """Runs a :class:`qtrainer.Module`'s training, validation, test and prediction.

    Args:
        max_epochs: stop after this many epochs (default 1000 when ``max_steps`` is None too).
        max_steps: stop after this many optimizer steps.
        limit_train_batches / limit_val_batches / limit_test_batches / limit_predict_batches:
            batches per epoch: an int count or a float fraction of the loader.
        val_check_interval: a float fraction of the training epoch, or an int number of batches,
            between validations.
        check_val_every_n_epoch: validate every n-th epoch.
        num_sanity_val_steps: validation batches run before training to catch bugs early.
        accumulate_grad_batches: batches whose gradients add up before each optimizer step.
        gradient_clip_val / gradient_clip_algorithm: clip gradients by global ``"norm"`` or ``"value"``.
        precision: ``"32"``, ``"16-mixed"`` or ``"bf16-mixed"`` (mixed precision via ``paddle.amp``
            where the device supports it).
        device: ``"auto"``, ``"cpu"``, ``"gpu"`` or ``"gpu:N"``.
        num_threads: CPU math threads (default: the cores available to this process).
        seed: seed Python, NumPy and Paddle at the start of each run.
        callbacks: callbacks for every run of this Trainer.
        logger: a Logger, a list of them, True (TensorBoard under ``default_root_dir``) or False.
        enable_progress_bar / enable_checkpointing: add the default progress bar /
            ``ModelCheckpoint`` when none is given (one given to ``fit(callbacks=...)`` replaces
            the default for that call).
        default_root_dir: where logs and checkpoints go (default: the working directory).
        log_every_n_steps: how often per-step metrics are sent to the loggers.
        strategy: ``"auto"`` (data-parallel under ``paddle.distributed.launch`` or with
            ``devices > 1``), ``"ddp"``, ``"single_device"``, or a ``qtrainer.strategy`` instance
            (see ``qtrainer.distributed`` for launching several processes).
        devices: processes on this node: an int, or ``"auto"``. Without a launcher,
            ``devices=N > 1`` makes ``fit``/``validate``/``test`` spawn ``N`` processes.
    """

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        val_check_interval: int | float = 1.0,
        check_val_every_n_epoch: int = 1,
        num_sanity_val_steps: int = 2,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        precision: str | int = "32",
        device: str = "auto",
        num_threads: int | None = None,
        seed: int | None = None,
        callbacks: list[Callback] | None = None,
        logger: Logger | list[Logger] | bool = True,
        enable_progress_bar: bool = True,
        enable_checkpointing: bool = True,
        default_root_dir: str | None = None,
        log_every_n_steps: int = 50,
        strategy: Any = "auto",
        devices: int | str = "auto",
    ) -> None:
        _check_positive_int("max_epochs", max_epochs)
        _check_positive_int("max_steps", max_steps)
        _check_positive_int("accumulate_grad_batches", accumulate_grad_batches, allow_none=False)
        _check_positive_int("check_val_every_n_epoch", check_val_every_n_epoch, allow_none=False)
        _check_positive_int("log_every_n_steps", log_every_n_steps, allow_none=False)
        for name, value in (("limit_train_batches", limit_train_batches), ("limit_val_batches", limit_val_batches),
                            ("limit_test_batches", limit_test_batches), ("limit_predict_batches", limit_predict_batches)):
            _check_limit(name, value)
        if isinstance(val_check_interval, bool) or not (
            isinstance(val_check_interval, int) and val_check_interval >= 1
            or isinstance(val_check_interval, float) and 0.0 < val_check_interval <= 1.0
        ):
            raise ValueError(f"val_check_interval={val_check_interval!r}: use a float in (0, 1] or an int >= 1 (batches)")
        if isinstance(num_sanity_val_steps, bool) or not isinstance(num_sanity_val_steps, int) or num_sanity_val_steps < 0:
            raise ValueError(f"num_sanity_val_steps={num_sanity_val_steps!r}: use an integer >= 0")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm={gradient_clip_algorithm!r}: use 'norm' or 'value'")
        if gradient_clip_val is not None and not (isinstance(gradient_clip_val, (int, float)) and gradient_clip_val > 0):
            raise ValueError(f"gradient_clip_val={gradient_clip_val!r}: use a positive number or None")
        if num_threads is not None:
            _check_positive_int("num_threads", num_threads)

        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.max_epochs = 1000 if max_epochs is None and max_steps is None else max_epochs
        self.max_steps = max_steps
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.limit_test_batches = limit_test_batches
        self.limit_predict_batches = limit_predict_batches
        self.val_check_interval = val_check_interval
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.num_sanity_val_steps = num_sanity_val_steps
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.num_threads = num_threads
        self.seed = seed
        self.log_every_n_steps = log_every_n_steps
        self.strategy: SingleProcess = resolve_strategy(strategy, devices, self.device)

        self.default_root_dir = os.path.abspath(default_root_dir or os.getcwd())
        _check_writable_dir(self.default_root_dir)
        self.loggers = self._make_loggers(logger)
        self.callbacks = self._make_callbacks(list(callbacks or []), enable_progress_bar, enable_checkpointing)

        # Run state (what a checkpoint captures is in _dump_checkpoint).
        self.current_epoch = 0
        self.global_step = 0
        self.should_stop = False
        self.sanity_checking = False
        self.failed = False
        self.state_stage: str | None = None
        self.callback_metrics: dict[str, float] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.logged_metrics: dict[str, float] = {}
        self.log_history: list[dict[str, float]] = []
        self.optimizers: list = []
        self.lr_schedulers: list[dict[str, Any]] = []
        self.module: Module | None = None
        self.model = None
        self.train_dataloader = None
        self.val_dataloaders = None
        self.num_training_batches: float = 0
        self.num_val_batches: float = 0
        self.num_test_batches: float = 0
        self.num_predict_batches: float = 0
        self.grad_scaler = None
        self._batches_done_in_epoch = 0
        self._epoch_finished = False
        self._data_seed = 0
        self._resume: dict[str, Any] | None = None
        self._train_results = LoggedResults()
        self._results: LoggedResults | None = None
        self._log_context = "train_step"
        self._running_loss: deque[float] = deque(maxlen=_RUNNING_LOSS_WINDOW)
        self._accumulated = 0
        self._gradients_checked = False
        self._current_batch_size = 1
        self._hook_receivers: dict[str, tuple[tuple[Callback, ...], bool]] = {}
        self._hook_receivers_for: tuple = ()
        self._last_synced: tuple[paddle.Tensor, int, float] | None = None

    # -- construction helpers ------------------------------------------------------------
    def _make_loggers(self, logger: Any) -> list[Logger]:
        if logger is True:
            from qtrainer.loggers import TensorBoardLogger

            return [TensorBoardLogger(self.default_root_dir)]
        if logger is False or logger is None:
            return []
        loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
        for item in loggers:
            if not isinstance(item, Logger):
                raise TypeError(f"logger must be a qtrainer Logger, a list of them, True or False; got {type(item).__name__}")
        return loggers

    def _make_callbacks(self, callbacks: list[Callback], progress_bar: bool, checkpointing: bool) -> list[Callback]:
        from qtrainer.callbacks import ModelCheckpoint, TQDMProgressBar

        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks must be qtrainer Callback instances; got {type(callback).__name__}")
        if not checkpointing and any(isinstance(c, ModelCheckpoint) for c in callbacks):
            raise ValueError("a ModelCheckpoint was passed in callbacks but enable_checkpointing=False; drop one of them")
        self._default_callbacks: tuple[Callback, ...] = ()  # replaced by a user's callback of the same kind
        if checkpointing and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(ModelCheckpoint())
            self._default_callbacks += (callbacks[-1],)
        if progress_bar and not any(isinstance(c, TQDMProgressBar) for c in callbacks):
            callbacks.insert(0, TQDMProgressBar())
            self._default_callbacks += (callbacks[0],)
        return callbacks

    def _with_run_callbacks(self, extra: list[Callback]) -> list[Callback]:
        """The Trainer's callbacks plus ``extra``; a ``ModelCheckpoint`` or ``TQDMProgressBar`` in
        ``extra`` replaces the default one the Trainer added (as Lightning adds a default only
        when the user gave none), so there are never two checkpointers or two bars by accident."""
        from qtrainer.callbacks import ModelCheckpoint, TQDMProgressBar

        replaced = tuple(kind for kind in (ModelCheckpoint, TQDMProgressBar) if any(isinstance(c, kind) for c in extra))
        own = [c for c in self.callbacks
               if not (any(c is d for d in self._default_callbacks) and isinstance(c, replaced))]
        return own + extra

    @staticmethod
    def _ordered(callbacks: list[Callback]) -> list[Callback]:
        """Checkpoint callbacks run last, so they see what the others did."""
        from qtrainer.callbacks import ModelCheckpoint

        others = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        return others + [c for c in callbacks if isinstance(c, ModelCheckpoint)]

    # -- public properties ---------------------------------------------------------------
    @property
    def logger(self) -> Logger | None:
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self) -> str:
        if self.logger is not None and self.logger.log_dir is not None:
            return self.logger.log_dir
        return self.default_root_dir

    @property
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def checkpoint_callbacks(self) -> list:
        from qtrainer.callbacks import ModelCheckpoint

        return [c for c in self.callbacks if isinstance(c, ModelCheckpoint)]

    @property
    def checkpoint_callback(self):
        callbacks = self.checkpoint_callbacks
        return callbacks[0] if callbacks else None

    # -- hooks -------------------------------------------------------------------------------
    def _call_hook(self, name: str, *args: Any) -> None:
        callbacks, module_receives = self._receivers(name)
        for callback in callbacks:
            getattr(callback, name)(self, self.module, *args)
        if module_receives:
            getattr(self.module, name)(*args)

    def _receivers(self, name: str) -> tuple[tuple[Callback, ...], bool]:
        """The callbacks that override hook ``name``, and whether the module does (looked up once
        per run and set of callbacks, so hooks nobody overrides cost nothing per batch)."""
        key = (self.module, *self.callbacks)
        if key != self._hook_receivers_for:
            self._hook_receivers, self._hook_receivers_for = {}, key
        receivers = self._hook_receivers.get(name)
        if receivers is None:
            callbacks = tuple(c for c in self.callbacks if overrides_hook(c, Callback, name))
            module_receives = name in MODULE_HOOKS and overrides_hook(self.module, Module, name)
            receivers = self._hook_receivers[name] = (callbacks, module_receives)
        return receivers

    def _call_callbacks(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, self.module, *args)

    def _handle_exception(self, exc: BaseException) -> None:
        if self.failed:
            return
        self.failed = True
        for callback in self.callbacks:
            try:
                callback.on_exception(self, self.module, exc)
            except Exception:  # noqa: BLE001 - the original exception is what the user must see
                log.exception("%s.on_exception raised while handling %r", type(callback).__name__, exc)

    @contextlib.contextmanager
    def _span(self, start: str, end: str):
        """Fire ``start``, run the body, and always fire ``end`` (after ``on_exception`` on failure)."""
        self._call_hook(start)
        try:
            yield
        except BaseException as exc:
            self._handle_exception(exc)
            raise
        finally:
            if self.failed:
                try:
                    self._call_hook(end)
                except Exception:  # noqa: BLE001
                    log.exception("%s raised while handling a failed run", end)
            else:
                self._call_hook(end)

    # -- logging -----------------------------------------------------------------------------
    def _log_from_module(self, name: str, value: Any, *, prog_bar: bool, logger: bool, on_step: bool | None,
                         on_epoch: bool | None, reduce_fx: str, batch_size: int | None) -> None:
        if self._results is None:
            raise RuntimeError(f"self.log({name!r}) was called outside a training/validation/test step or hook")
        in_step = self._log_context == "train_step"
        on_step = in_step if on_step is None else on_step
        on_epoch = (not in_step) if on_epoch is None else on_epoch
        if self._log_context != "train_step" and on_step:
            on_step = False  # validation/test and epoch-end hooks only reduce per epoch
            on_epoch = True
        weight = batch_size if batch_size is not None else self._current_batch_size
        self._results.log(name, self._to_host(value, name), weight=weight, on_step=on_step, on_epoch=on_epoch,
                          prog_bar=prog_bar, logger=logger, reduce_fx=reduce_fx)

    def _to_host(self, value: Any, name: str) -> float:
        """``to_float(value)``; the last tensor converted is remembered, so a loss that the module
        logs and returns is copied to the host once per step."""
        synced = self._last_synced
        if synced is not None and synced[0] is value and synced[1] == value._inplace_version():
            return synced[2]
        number = to_float(value, name)
        if self._log_context == "train_step" and isinstance(value, paddle.Tensor):
            self._last_synced = (value, value._inplace_version(), number)
        return number

    def _publish(self, values: dict[str, tuple[float, Any]], step: int | None, to_loggers: bool,
                 extra: dict[str, float] | None = None) -> dict[str, float]:
        """Make metrics visible to callbacks and the progress bar; send them (and ``extra``) to the loggers."""
        metrics: dict[str, float] = {}
        logged: dict[str, float] = {}
        for name, (value, entry) in values.items():
            metrics[name] = value
            if entry.prog_bar:
                self.progress_bar_metrics[name] = value
            if to_loggers and entry.logger:
                logged[name] = value
        self.callback_metrics.update(metrics)
        if to_loggers:
            logged.update(extra or {})
        if to_loggers and logged:
            self.logged_metrics.update(logged)
            self.log_metrics(logged, step)
        return metrics

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Send plain-float metrics to every logger (rank 0 only)."""
        if not self.is_global_zero or not metrics:
            return
        step = self.global_step if step is None else step
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def log_histogram(self, tag: str, values: Any, step: int | None = None) -> None:
        """Send a histogram to every logger that draws them (rank 0 only)."""
        if not self.is_global_zero:
            return
        step = self.global_step if step is None else step
        for logger in self.loggers:
            logger.log_histogram(tag, np.asarray(values), step)

    # -- public entry points -----------------------------------------------------------
    def fit(self, model: Module, train_dataloaders: Iterable | None = None, val_dataloaders: Iterable | None = None,
            callbacks: list[Callback] | None = None, ckpt_path: str | None = None) -> None:
        """Train ``model``; ``callbacks`` join the Trainer's for this call (a ``ModelCheckpoint`` or
        ``TQDMProgressBar`` among them replaces the Trainer's default one); ``ckpt_path`` resumes
        (``"last"`` = the newest checkpoint of this Trainer's checkpoint callbacks; for a default
        checkpoint directory under a logger's ``version_N``, the newest in any ``version_*``)."""
        if self.strategy.needs_spawn:
            return self._spawn("fit", model, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders,
                               callbacks=callbacks, ckpt_path=ckpt_path)
        self._run("fit", model, callbacks, lambda: self._fit(train_dataloaders, val_dataloaders, ckpt_path))

    def validate(self, model: Module, dataloaders: Iterable | None = None, ckpt_path: str | None = None,
                 callbacks: list[Callback] | None = None) -> list[dict[str, float]]:
        """Run the validation loop once; return ``[metrics]``."""
        if self.strategy.needs_spawn:
            return self._spawn("validate", model, dataloaders=dataloaders, ckpt_path=ckpt_path, callbacks=callbacks)
        return self._run("validate", model, callbacks, lambda: self._evaluate("validation", dataloaders, ckpt_path))

    def test(self, model: Module, dataloaders: Iterable | None = None, ckpt_path: str | None = None,
             callbacks: list[Callback] | None = None) -> list[dict[str, float]]:
        """Run the test loop once; return ``[metrics]``."""
        if self.strategy.needs_spawn:
            return self._spawn("test", model, dataloaders=dataloaders, ckpt_path=ckpt_path, callbacks=callbacks)
        return self._run("test", model, callbacks, lambda: self._evaluate("test", dataloaders, ckpt_path))

    def predict(self, model: Module, dataloaders: Iterable | None = None, ckpt_path: str | None = None,
                callbacks: list[Callback] | None = None) -> list[Any]:
        """Run ``predict_step`` over the loader; return the list of its outputs (in this process
        when the Trainer would otherwise spawn processes)."""
        return self._run("predict", model, callbacks, lambda: self._predict(dataloaders, ckpt_path))

    def run_validation(self) -> dict[str, float]:
        """Run the validation block now, from a callback during ``fit`` (e.g. after PTQ calibration).

        Fires the validation hooks, publishes the metrics to callbacks and loggers and records them
        in ``log_history``; returns them (empty when the fit has no validation data).
        """
        if self.state_stage != "fit" or self.module is None:
            raise RuntimeError("Trainer.run_validation() is for callbacks during fit()")
        if self.val_dataloaders is None or not self.num_val_batches:
            return {}
        results, context = self._results, self._log_context
        try:
            metrics = self._evaluation_epoch("validation", self.val_dataloaders, self.num_val_batches)
        finally:
            self._results, self._log_context = results, context
        self._record_history(metrics)
        return metrics

    def save_checkpoint(self, filepath: str) -> None:
        """Write a full checkpoint atomically (rank 0 writes; every rank must call this and waits for it)."""
        train_results = self._train_results_state()
        if self.is_global_zero:
            checkpoint = self._dump_checkpoint()
            checkpoint["train_results"] = train_results
            _check_finite_weights(checkpoint["state_dict"], filepath)
            save_checkpoint_file(checkpoint, filepath)
        self.strategy.barrier()

    def _train_results_state(self) -> dict[str, Any]:
        """The epoch's training-metric sums so far, over all ranks (a resumed rank 0 continues from them)."""
        state = self._train_results.state_dict()
        if self.world_size == 1:
            return state
        for name in sorted(state):
            entry = state[name]
            sums = self.strategy.all_reduce(np.array([entry["total"], entry["weight"]], dtype=np.float64), "sum")
            entry["total"], entry["weight"] = float(sums[0]), float(sums[1])
            if entry["reduce_fx"] in ("max", "min"):
                value = self.strategy.all_reduce(np.array([entry["extreme"]], dtype=np.float64), entry["reduce_fx"])
                entry["extreme"] = float(value[0])
        return state

    # -- run skeleton --------------------------------------------------------------------
    def _spawn(self, stage: str, model: Module, **kwargs: Any) -> Any:
        """Run ``stage`` on the processes the strategy spawns (see ``qtrainer.distributed``)."""
        from qtrainer.distributed import spawn_run

        if not isinstance(model, Module):
            raise TypeError(f"Trainer.{stage} needs a qtrainer.Module, got {type(model).__name__}")
        return spawn_run(self, stage, model, kwargs)

    def _run(self, stage: str, model: Module, extra_callbacks: list[Callback] | None, body: Callable[[], Any]) -> Any:
        if not isinstance(model, Module):
            raise TypeError(
                f"Trainer.{stage} needs a qtrainer.Module, got {type(model).__name__}; wrap a plain "
                "paddle.nn.Layer classifier with qtrainer.ClassificationModule(net)"
            )
        extra = list(extra_callbacks or [])
        for callback in extra:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks must be qtrainer Callback instances; got {type(callback).__name__}")
        own_callbacks = self.callbacks
        self.callbacks = self._ordered(self._with_run_callbacks(extra))
        self.module, model._trainer = model, self
        self._hook_receivers_for = ()  # hooks are looked up afresh for every run
        self.state_stage, self.failed, self.should_stop = stage, False, False
        self.device = self.strategy.setup(self.device)
        paddle.set_device(self.device)
        set_num_threads(self.num_threads or default_num_threads(self.strategy.local_world_size))
        self._share_logger_versions()
        if self.seed is not None:
            seed_everything(self.seed)
        status = "failed"
        try:
            self._call_hook("setup", stage)
            self._call_hook("configure_model")
            result = body()
            status = "success"
            return result
        except KeyboardInterrupt as exc:
            status = "interrupted"
            self._handle_exception(exc)
            raise
        except BaseException as exc:
            self._handle_exception(exc)
            raise
        finally:
            try:
                self._call_hook("teardown", stage)
            finally:
                if self.is_global_zero:
                    for logger in self.loggers:
                        logger.finalize(status)
                self.callbacks = own_callbacks
                self._results = None
                self._last_synced = None

    def _share_logger_versions(self) -> None:
        """Every rank logs (and checkpoints) under rank 0's ``version`` directory."""
        if self.world_size == 1 or not self.loggers:
            return
        versions = self.strategy.broadcast_object([logger.version if self.is_global_zero else None
                                                   for logger in self.loggers])
        for logger, version in zip(self.loggers, versions):
            if hasattr(logger, "_version"):
                logger._version = version

    def _fit(self, train_dataloaders: Iterable | None, val_dataloaders: Iterable | None, ckpt_path: str | None) -> None:
        module = self.module
        train_loader = train_dataloaders if train_dataloaders is not None else module.train_dataloader()
        if train_loader is None:
            raise ValueError("no training data: pass train_dataloaders to fit() or define train_dataloader() on the module")
        val_loader = val_dataloaders if val_dataloaders is not None else module.val_dataloader()
        train_loader = self.strategy.prepare_dataloader(train_loader, "train")
        if val_loader is not None:
            val_loader = self.strategy.prepare_dataloader(val_loader, "validation")
        self.train_dataloader, self.val_dataloaders = train_loader, val_loader

        checkpoint = None
        if ckpt_path is not None:
            path = self._resolve_ckpt_path(ckpt_path)
            checkpoint = load_checkpoint_file(path)
            self._restore_module(checkpoint, path, hooks=True)
        else:
            self.current_epoch, self.global_step, self.log_history = 0, 0, []
            self._resume = None
            self._data_seed = self.seed if self.seed is not None else int(np.random.randint(0, 2**31 - 1))
        self.model = self.strategy.wrap_model(module)
        self.optimizers, self.lr_schedulers = parse_optimizers(module.configure_optimizers())
        self.grad_scaler = paddle.amp.GradScaler() if self.precision.needs_grad_scaler else None
        if checkpoint is not None:
            self._restore_training_state(checkpoint)
        for optimizer in self.optimizers:  # gradients left by an earlier run would hide a loss that reaches none
            optimizer.clear_grad(set_to_zero=False)
        self._gradients_checked = False

        self.num_training_batches = agree_on_batches(
            self.strategy, "train", self._limited_length(train_loader, self.limit_train_batches, "limit_train_batches"))
        if self.num_training_batches == 0:
            raise ValueError("the training loader yields no batches (empty dataset or limit_train_batches=0)")
        self.num_val_batches = (
            self._limited_length(val_loader, self.limit_val_batches, "limit_val_batches") if val_loader is not None else 0
        )
        if val_loader is not None:
            self.num_val_batches = agree_on_batches(self.strategy, "validation", self.num_val_batches)
        if self.is_global_zero:
            hparams = getattr(module, "hparams", None)
            if hparams:
                for logger in self.loggers:
                    logger.log_hyperparams(dict(hparams))
        with self._span("on_fit_start", "on_fit_end"):
            if val_loader is not None and self.num_val_batches and self.num_sanity_val_steps:
                self._sanity_check(val_loader)
            with self._span("on_train_start", "on_train_end"):
                self._train_loop(train_loader, val_loader)
            if self.is_global_zero and getattr(module, "hparams", None):
                final = self._final_metrics()
                for logger in self.loggers:
                    logger.log_hyperparams(dict(module.hparams), final)

    def _final_metrics(self) -> dict[str, float]:
        """The fit's final metrics for the loggers' hyperparameter records, with ``hp_metric`` (unless
        the module logged one) = the final value of the first monitored metric (checkpoint callbacks
        first, then e.g. ``EarlyStopping``), else of ``val_loss``; no ``hp_metric`` when neither exists."""
        from qtrainer.callbacks import MonitorCallback

        final = dict(self.callback_metrics)
        if "hp_metric" not in final:
            watchers = self.checkpoint_callbacks + [c for c in self.callbacks if isinstance(c, MonitorCallback)]
            names = [c.monitor for c in watchers if isinstance(c, MonitorCallback) and c.monitor] + ["val_loss"]
            chosen = next((name for name in names if name in final), None)
            if chosen is not None:
                final["hp_metric"] = final[chosen]
        return final

    def _sanity_check(self, val_loader: Iterable) -> None:
        self.sanity_checking = True
        saved = (dict(self.callback_metrics), dict(self.progress_bar_metrics))
        try:
            with self._span("on_sanity_check_start", "on_sanity_check_end"):
                self._evaluation_epoch("validation", val_loader, min(self.num_sanity_val_steps, self.num_val_batches))
        finally:
            self.sanity_checking = False
            self.callback_metrics, self.progress_bar_metrics = saved

    # -- training ----------------------------------------------------------------------
    def _done(self) -> bool:
        if self.should_stop:
            return True
        if self.max_steps is not None and self.global_step >= self.max_steps:
            return True
        return self.max_epochs is not None and self.current_epoch >= self.max_epochs

    def _val_check_batches(self) -> float:
        if isinstance(self.val_check_interval, int):
            return self.val_check_interval
        if math.isinf(self.num_training_batches):
            if self.val_check_interval != 1.0:
                raise ValueError("val_check_interval as a fraction needs a loader with a length; use an int number of batches")
            return math.inf
        return max(1, int(self.num_training_batches * self.val_check_interval))

    def _validation_due_this_epoch(self) -> bool:
        return bool(self.val_dataloaders is not None and self.num_val_batches
                    and (self.current_epoch + 1) % self.check_val_every_n_epoch == 0)

    def _train_loop(self, train_loader: Iterable, val_loader: Iterable | None) -> None:
        module = self.module
        val_every = self._val_check_batches()
        while not self._done():
            _set_sampler_epoch(train_loader, self.current_epoch)
            seed_data_rngs(self._data_seed, self.current_epoch)
            resume, self._resume = self._resume, None
            if resume is not None and not resume["batches_done"]:
                restore_paddle_rng_state(resume["rng"])
            if resume is None or not resume["batches_done"]:
                self._train_results.reset()
            self._epoch_finished = False
            module.train()
            self._log_context, self._results = "train_step", self._train_results
            self._call_hook("on_train_epoch_start")
            iterator = guard_iterator(iter(train_loader))
            batch_idx = 0
            if resume is not None and resume["batches_done"]:
                for _ in range(resume["batches_done"]):
                    next(iterator)
                batch_idx = resume["batches_done"]
                restore_paddle_rng_state(resume["rng"])
            # A step checkpoint is written after the validation of its batch, so a run resumed
            # from it has already validated there.
            validated_at_end = batch_idx > 0 and batch_idx % val_every == 0 and self._validation_due_this_epoch()
            checkpointers = self.checkpoint_callbacks
            while batch_idx < self.num_training_batches:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                stepped = self._training_batch(batch, batch_idx)
                batch_idx += 1
                self._batches_done_in_epoch = batch_idx
                validated_at_end = False
                if batch_idx % val_every == 0 and self._validation_due_this_epoch():
                    self._run_validation(val_loader)
                    validated_at_end = True
                if stepped:
                    for callback in checkpointers:
                        callback.on_step_checkpoint(self, module)
                if self.max_steps is not None and self.global_step >= self.max_steps:
                    break
            _close_iterator(iterator)
            if batch_idx == 0:
                self._empty_training_epoch(train_loader)
                validated_at_end = True  # nothing changed since the last validation
            if not validated_at_end and isinstance(self.val_check_interval, float) and self._validation_due_this_epoch():
                self._run_validation(val_loader)
            completed = not (self.max_steps is not None and self.global_step >= self.max_steps
                             and batch_idx < self.num_training_batches)
            self._end_training_epoch(completed)

    def _empty_training_epoch(self, train_loader: Iterable) -> None:
        """An epoch in which the training loader yielded nothing: an error when nothing
        has been trained in this fit, else (an iterator exhausted by its first pass) a warning, and
        the fit stops instead of running the remaining epochs empty."""
        kind = type(train_loader).__name__
        if not math.isinf(self.num_training_batches):
            kind += f", {self.num_training_batches} batches expected"
        else:
            kind += ", without len()"
        if not self._gradients_checked:
            raise ValueError(
                f"the training loader ({kind}) yielded no batches in epoch {self.current_epoch}: "
                "nothing was trained; check the dataset (empty, or filtered to nothing)")
        one_shot = isinstance(train_loader, collections.abc.Iterator)  # not iter(): that would start a loader
        log.warning(
            "the training loader (%s) yielded no batches in epoch %d%s; stopping the fit after %d epoch(s) "
            "instead of running the remaining ones empty", kind, self.current_epoch,
            " (an iterator or generator is used up by its first pass; pass a re-iterable loader such as a list "
            "or a paddle.io.DataLoader)" if one_shot else "", self.current_epoch)
        self.should_stop = True

    def _training_batch(self, batch: Any, batch_idx: int) -> bool:
        """One forward/backward (and optimizer step when due); True when the optimizer stepped."""
        module = self.module
        self._current_batch_size = _batch_size(batch)
        batch = _to_device(batch, self.device)
        self._call_hook("on_train_batch_start", batch, batch_idx)
        last_batch = batch_idx + 1 == self.num_training_batches
        # gradients are reduced across ranks only on the micro-batch that steps the optimizer
        sync = self._accumulated + 1 >= self.accumulate_grad_batches or last_batch
        try:
            with self.precision.autocast():
                outputs = self.strategy.training_step(self.model, batch, batch_idx, sync_gradients=sync)
        except ValueError as exc:
            _raise_layer_error(exc, module, "training_step")
            raise
        loss = self._extract_loss(outputs)
        if not self._gradients_checked and loss.stop_gradient:
            raise ValueError(
                f"{type(module).__name__}.training_step returned a loss with stop_gradient=True (was it .detach()ed, "
                "computed under paddle.no_grad(), or are all parameters frozen?): no gradient reached any "
                "parameter, so training would change nothing; return the loss as computed from the model's output")
        loss_value = self._to_host(loss, "loss")  # shared with the module's self.log of the same tensor
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"the training loss is {loss_value} at epoch {self.current_epoch}, batch {batch_idx} "
                f"(global step {self.global_step}); stopping. No checkpoint with non-finite weights is written."
            )
        self._running_loss.append(loss_value)
        self._call_hook("on_before_backward", loss)
        scaled = loss / self.accumulate_grad_batches if self.accumulate_grad_batches > 1 else loss
        (self.grad_scaler.scale(scaled) if self.grad_scaler is not None else scaled).backward()
        self._call_hook("on_after_backward")
        self._accumulated += 1
        stepped = False
        if self._accumulated >= self.accumulate_grad_batches or last_batch:
            if not self._gradients_checked:
                self._check_gradients_reached()
            self._optimizer_step()
            stepped = True
        self._call_hook("on_train_batch_end", outputs, batch, batch_idx)
        self._last_synced = None  # do not keep this step's tensors alive
        self.progress_bar_metrics["loss"] = sum(self._running_loss) / len(self._running_loss)
        step_values = self._train_results.step_values()
        log_now = stepped and self.global_step % self.log_every_n_steps == 0
        self._publish(step_values, self.global_step, to_loggers=log_now)
        return stepped

    def _extract_loss(self, outputs: Any) -> paddle.Tensor:
        where = f"{type(self.module).__name__}.training_step"
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            raise ValueError(f"{where} returned {'a dict without a loss' if isinstance(outputs, dict) else 'None'}; "
                             "return a scalar loss tensor or a dict with 'loss'")
        if not isinstance(loss, paddle.Tensor):
            raise TypeError(f"{where} returned a loss of type {type(loss).__name__}; return a scalar paddle.Tensor")
        if math.prod(loss.shape) != 1:  # not loss.size, which costs more than a small kernel
            raise ValueError(f"{where} returned a loss of shape {list(loss.shape)}; reduce it to a scalar (e.g. .mean())")
        return loss

    def _check_gradients_reached(self) -> None:
        """Before the fit's first optimizer step: some trainable parameter must have a gradient."""
        module = self.module
        trainable = [p for p in module.parameters() if not p.stop_gradient]
        if not any(p.grad is not None for p in trainable):
            why = (f"none of its {len(trainable)} trainable parameters" if trainable
                   else "it has no trainable parameters (all have stop_gradient=True)")
            raise ValueError(
                f"no gradient reached any parameter of {type(module).__name__} after the first backward: {why} "
                "received one, so training would change nothing; the loss returned by training_step must be "
                "computed from the model's trainable parameters")
        self._gradients_checked = True

    def _optimizer_step(self) -> None:
        parameters = None  # walking a large model's parameters costs; only clipping needs them
        for optimizer in self.optimizers:
            self._call_hook("on_before_optimizer_step", optimizer)
            if self.grad_scaler is not None:
                self.grad_scaler.unscale_(optimizer)
            if self.gradient_clip_val is not None:
                if parameters is None:
                    parameters = [p for p in self.module.parameters() if not p.stop_gradient]
                with_grad = [p for p in parameters if p.grad is not None]
                if self.gradient_clip_algorithm == "norm":
                    paddle.nn.utils.clip_grad_norm_(with_grad, self.gradient_clip_val)
                else:
                    paddle.nn.utils.clip_grad_value_(with_grad, self.gradient_clip_val)
            if self.grad_scaler is not None:
                self.grad_scaler.step(optimizer)
                self.grad_scaler.update()
            else:
                optimizer.step()
            self._call_hook("on_before_zero_grad", optimizer)
            optimizer.clear_grad()
        self._accumulated = 0
        self.global_step += 1
        for config in self.lr_schedulers:
            if config["interval"] == "step" and self.global_step % config["frequency"] == 0:
                config["scheduler"].step()

    def _end_training_epoch(self, completed: bool) -> None:
        """Epoch-end hooks, epoch metrics, schedulers, checkpoints and the stop decision.

        An epoch cut short by ``max_steps`` is checkpointed as unfinished, so a resumed run with
        a larger ``max_steps`` continues with the rest of that epoch.
        """
        module = self.module
        epoch_values = self._train_results.epoch_values(self.strategy.all_reduce)
        self._publish(epoch_values, self.global_step, to_loggers=False)
        self._log_context = "train_epoch_end"
        self._call_hook("on_train_epoch_end")
        self._log_context = "train_step"
        epoch_values = self._train_results.epoch_values(self.strategy.all_reduce)
        metrics = self._publish(epoch_values, self.global_step, to_loggers=True, extra={"epoch": float(self.current_epoch)})
        self._record_history(metrics)
        for config in self.lr_schedulers:
            if completed and config["interval"] == "epoch" and (self.current_epoch + 1) % config["frequency"] == 0:
                config["scheduler"].step()
        self._epoch_finished = completed
        for callback in self.checkpoint_callbacks:
            callback.on_epoch_checkpoint(self, module)
        self.should_stop = self.strategy.reduce_boolean_decision(self.should_stop)
        if completed:
            self.current_epoch += 1
            self._batches_done_in_epoch = 0
        self._epoch_finished = False

    def _record_history(self, metrics: dict[str, float]) -> None:
        if self.log_history and self.log_history[-1]["step"] == self.global_step and \
                self.log_history[-1]["epoch"] == self.current_epoch:
            self.log_history[-1].update(metrics)
        else:
            self.log_history.append({"epoch": self.current_epoch, "step": self.global_step, **metrics})

    def _run_validation(self, val_loader: Iterable) -> None:
        metrics = self._evaluation_epoch("validation", val_loader, self.num_val_batches)
        self._record_history(metrics)
        self.module.train()
        self._log_context, self._results = "train_step", self._train_results

    # -- evaluation ------------------------------------------------------------------------
    def _evaluation_epoch(self, stage: str, loader: Iterable, num_batches: float) -> dict[str, float]:
        """One pass of validation or test; returns the epoch metrics."""
        module = self.module
        step_fn = getattr(module, f"{stage}_step", None)
        was_training = module.training
        module.eval()
        results = LoggedResults()
        self._log_context, self._results = stage, results
        try:
            with self._span(f"on_{stage}_start", f"on_{stage}_end"):
                self._call_hook(f"on_{stage}_epoch_start")
                with paddle.no_grad():
                    iterator = guard_iterator(iter(loader))
                    for batch_idx, batch in enumerate(iterator):
                        if batch_idx >= num_batches:
                            break
                        self._current_batch_size = _batch_size(batch)
                        batch = _to_device(batch, self.device)
                        self._call_hook(f"on_{stage}_batch_start", batch, batch_idx)
                        try:
                            with self.precision.autocast():
                                outputs = step_fn(batch, batch_idx) if step_fn is not None else None
                        except ValueError as exc:
                            _raise_layer_error(exc, module, f"{stage}_step")
                            raise
                        self._call_hook(f"on_{stage}_batch_end", outputs, batch, batch_idx)
                    _close_iterator(iterator)
                self._call_hook(f"on_{stage}_epoch_end")
                metrics = self._publish(results.epoch_values(self.strategy.all_reduce), self.global_step,
                                        to_loggers=not self.sanity_checking)
        finally:
            if was_training:
                module.train()
        return metrics

    def _evaluate(self, stage: str, dataloaders: Iterable | None, ckpt_path: str | None) -> list[dict[str, float]]:
        loader = dataloaders if dataloaders is not None else getattr(self.module, f"{'val' if stage == 'validation' else stage}_dataloader")()
        if loader is None:
            raise ValueError(f"no {stage} data: pass dataloaders or define the module's "
                             f"{'val' if stage == 'validation' else stage}_dataloader()")
        if not hasattr(type(self.module), f"{stage}_step"):
            raise NotImplementedError(f"{type(self.module).__name__} has no {stage}_step(batch, batch_idx)")
        if ckpt_path is not None:
            path = self._resolve_ckpt_path(ckpt_path)
            self._restore_module(load_checkpoint_file(path), path, hooks=False)
        loader = self.strategy.prepare_dataloader(loader, stage)
        limit = self.limit_val_batches if stage == "validation" else self.limit_test_batches
        num_batches = self._limited_length(loader, limit, "limit_val_batches" if stage == "validation" else "limit_test_batches")
        num_batches = agree_on_batches(self.strategy, stage, num_batches)
        if stage == "validation":
            self.num_val_batches = num_batches
        else:
            self.num_test_batches = num_batches
        return [self._evaluation_epoch(stage, loader, num_batches)]

    def _predict(self, dataloaders: Iterable | None, ckpt_path: str | None) -> list[Any]:
        module = self.module
        loader = dataloaders if dataloaders is not None else module.predict_dataloader()
        if loader is None:
            raise ValueError("no predict data: pass dataloaders or define the module's predict_dataloader()")
        if ckpt_path is not None:
            path = self._resolve_ckpt_path(ckpt_path)
            self._restore_module(load_checkpoint_file(path), path, hooks=False)
        self.num_predict_batches = self._limited_length(loader, self.limit_predict_batches, "limit_predict_batches")
        predictions = []
        module.eval()
        with self._span("on_predict_start", "on_predict_end"):
            self._call_hook("on_predict_epoch_start")
            with paddle.no_grad():
                for batch_idx, batch in enumerate(guard_iterator(iter(loader))):
                    if batch_idx >= self.num_predict_batches:
                        break
                    batch = _to_device(batch, self.device)
                    self._call_hook("on_predict_batch_start", batch, batch_idx)
                    try:
                        with self.precision.autocast():
                            outputs = module.predict_step(batch, batch_idx)
                    except ValueError as exc:
                        _raise_layer_error(exc, module, "predict_step")
                        raise
                    self._call_hook("on_predict_batch_end", outputs, batch, batch_idx)
                    predictions.append(outputs)
            self._call_hook("on_predict_epoch_end")
        return predictions

    def _limited_length(self, loader: Iterable, limit: int | float | None, name: str) -> float:
        length = _loader_length(loader)
        if limit is None:
            return length
        if isinstance(limit, float):
            if math.isinf(length):
                if limit in (0.0, 1.0):
                    return 0 if limit == 0.0 else length
                raise ValueError(f"{name}={limit} is a fraction but the loader has no length; use an int number of batches")
            return max(1, int(length * limit)) if limit > 0 else 0
        return min(length, limit)

    # -- checkpoints ---------------------------------------------------------------------
    def _dump_checkpoint(self) -> dict[str, Any]:
        module = self.module
        checkpoint: dict[str, Any] = {
            "qtrainer_checkpoint": FORMAT_VERSION,
            "qtrainer_version": __version__,
            "paddle_version": paddle.__version__,
            "trainer_state": {
                "epoch": self.current_epoch,
                "global_step": self.global_step,
                "batches_done": 0 if self._epoch_finished else self._batches_done_in_epoch,
                "epoch_finished": self._epoch_finished,
                "log_history": [dict(r) for r in self.log_history],
                "callback_metrics": dict(self.callback_metrics),
            },
            "state_dict": {k: v.numpy() for k, v in module.state_dict().items()},
            "optimizer_states": [portable_optimizer_state(o, module) for o in self.optimizers],
            "lr_schedulers": [c["scheduler"].state_dict() for c in self.lr_schedulers],
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "rng": capture_rng_state(),
            "data_seed": self._data_seed,
            "train_results": self._train_results.state_dict(),
            "running_loss": list(self._running_loss),
            "callbacks": {},
        }
        for callback in self.callbacks:
            state = callback.state_dict()
            if not state:
                continue
            if callback.state_key in checkpoint["callbacks"]:
                raise ValueError(
                    f"two callbacks share the checkpoint state key {callback.state_key!r} "
                    f"({type(callback).__name__}); give them different arguments so their states can be told apart"
                )
            checkpoint["callbacks"][callback.state_key] = state
        self._call_hook("on_save_checkpoint", checkpoint)
        return checkpoint

    def _resolve_ckpt_path(self, ckpt_path: str) -> str:
        """``ckpt_path`` itself, or for ``"last"`` the newest checkpoint of the checkpoint callbacks'
        directories; when those hold none and a directory is the default ``<log_dir>/checkpoints``,
        the newest in the other runs of that logger (``<root_dir>/version_*/checkpoints``): a new
        Trainer logs to a new ``version_N`` while the run to resume wrote an earlier one."""
        if ckpt_path != "last":
            return ckpt_path
        searched = [c.dirpath for c in self.checkpoint_callbacks if c.dirpath]
        candidates = [f for d in searched for f in _checkpoint_files(d)]
        if not candidates:
            patterns, others = self._other_runs_checkpoint_dirs(searched)
            searched += patterns
            candidates = [f for d in others for f in _checkpoint_files(d)]
            if candidates:
                log.info("ckpt_path='last': no checkpoint in this run's %s; resuming from the newest in %s",
                         self.checkpoint_callbacks[0].dirpath, others)
        if not candidates:
            where = (f"looked in {searched}" if searched else
                     "this Trainer has no ModelCheckpoint (enable_checkpointing=False and none in callbacks)")
            raise CheckpointError(f"ckpt_path='last' but no checkpoint (*.ckpt) was found: {where}; "
                                  "pass ckpt_path=<path of a .ckpt file> instead")
        return max(candidates, key=os.path.getmtime)

    def _other_runs_checkpoint_dirs(self, dirs: list[str]) -> tuple[list[str], list[str]]:
        """``(patterns, found)``: ``<root>/*/checkpoints`` and the existing ``<root>/<run>/checkpoints``
        of the loggers' other runs, for each of ``dirs`` that is a logger's default ``<log_dir>/checkpoints``."""
        patterns, found = [], []
        for logger in self.loggers:
            root, log_dir = getattr(logger, "root_dir", None), logger.log_dir
            if root is None or log_dir is None:
                continue
            default = os.path.join(log_dir, "checkpoints")
            if not any(os.path.abspath(d) == os.path.abspath(default) for d in dirs):
                continue
            patterns.append(os.path.join(root, "*", "checkpoints"))
            for run in sorted(os.listdir(root)) if os.path.isdir(root) else []:
                candidate = os.path.join(root, run, "checkpoints")
                if os.path.abspath(candidate) != os.path.abspath(default) and os.path.isdir(candidate):
                    found.append(candidate)
        return patterns, found

    def _restore_module(self, checkpoint: dict[str, Any], path: str, hooks: bool) -> None:
        """Weights (and, for fit, callback states) — after configure_model, before optimizers."""
        module = self.module
        if hooks:
            self._call_hook("on_load_checkpoint", checkpoint)
            for callback in self.callbacks:
                state = checkpoint["callbacks"].get(callback.state_key)
                if state is not None:
                    callback.load_state_dict(state)
        state_dict = checkpoint["state_dict"]
        own = module.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {path!r} does not match {type(module).__name__}: missing keys {missing[:10]}, "
                f"unexpected keys {unexpected[:10]} (was it saved with different callbacks, e.g. without QAT?)"
            )
        for key, value in state_dict.items():
            if list(own[key].shape) != list(value.shape):
                raise CheckpointError(f"checkpoint {path!r}: {key} has shape {list(value.shape)}, the model expects {list(own[key].shape)}")
        module.set_state_dict({k: paddle.to_tensor(v) for k, v in state_dict.items()})
        if hooks:
            state = checkpoint["trainer_state"]
            finished = state["epoch_finished"]
            self.current_epoch = state["epoch"] + (1 if finished else 0)
            self.global_step = state["global_step"]
            self.log_history = [dict(r) for r in state["log_history"]]
            self.callback_metrics = dict(state["callback_metrics"])
            self._data_seed = checkpoint["data_seed"]
            self._resume = {"batches_done": 0 if finished else state["batches_done"], "rng": checkpoint["rng"]}

    def _restore_training_state(self, checkpoint: dict[str, Any]) -> None:
        module = self.module
        states = checkpoint["optimizer_states"]
        if len(states) != len(self.optimizers):
            raise CheckpointError(f"the checkpoint has {len(states)} optimizer states; configure_optimizers made {len(self.optimizers)}")
        for optimizer, state in zip(self.optimizers, states):
            load_portable_optimizer_state(optimizer, module, state)
        for config, state in zip(self.lr_schedulers, checkpoint["lr_schedulers"]):
            config["scheduler"].set_state_dict(state)
        if self.grad_scaler is not None and checkpoint.get("grad_scaler"):
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
        if self._resume and self._resume["batches_done"]:
            if self.is_global_zero:  # the saved sums are over all ranks: the others start from zero
                self._train_results.load_state_dict(checkpoint["train_results"])
            else:
                self._train_results.reset()
        self._running_loss = deque(checkpoint.get("running_loss", []), maxlen=_RUNNING_LOSS_WINDOW)


def _check_finite_weights(state_dict: dict[str, np.ndarray], path: str) -> None:
    bad = [name for name, value in state_dict.items()
           if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()]
    if bad:
        raise FloatingPointError(f"refusing to write checkpoint {path!r}: non-finite values in {bad[:10]}")


def _raise_layer_error(exc: ValueError, module: Module, where: str) -> None:
    """Re-raise Paddle's shape error from inside a layer as one naming the layer and its expected input.

    Costs nothing until a step raises: the failing layer is the innermost ``forward`` frame of a
    ``paddle.nn.Layer`` in the traceback; its input is that call's first argument. Returns (the
    caller re-raises ``exc`` as it was) when the error is not Paddle's ``InvalidArgument`` or no
    layer can be found.
    """
    if "(InvalidArgument)" not in str(exc):
        return
    layer, inputs, tb = None, None, exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        candidate = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and isinstance(candidate, paddle.nn.Layer):
            names = frame.f_code.co_varnames
            layer = candidate
            inputs = frame.f_locals.get(names[1]) if frame.f_code.co_argcount > 1 else None
        tb = tb.tb_next
    if layer is None:
        return
    name = next((n for n, sub in module.named_sublayers(include_self=True) if sub is layer), None)
    shape = list(inputs.shape) if isinstance(inputs, paddle.Tensor) else None
    weight = getattr(layer, "weight", None)
    expected = ""
    if isinstance(layer, paddle.nn.Linear) and weight is not None:
        expected = f"; it expects [..., {weight.shape[0]}] (in_features={weight.shape[0]})"
    elif hasattr(layer, "_in_channels") and weight is not None:  # Conv1D/2D/3D and their transposes
        channels_last = str(getattr(layer, "_data_format", "NCHW")).endswith("C")
        spatial = ", ".join(("D", "H", "W")[3 - len(weight.shape[2:]):] if len(weight.shape) <= 5 else "...")
        dims = f"[N, {spatial}, {layer._in_channels}]" if channels_last else f"[N, {layer._in_channels}, {spatial}]"
        expected = f"; it expects {dims} (in_channels={layer._in_channels}, data_format={layer._data_format})"
    elif weight is not None:
        expected = f" (its weight has shape {list(weight.shape)})"
    first_line = str(exc).strip().splitlines()[0]
    raise ValueError(
        f"{type(module).__name__}.{where}: layer {name or '?'!r} ({type(layer).__name__}) got an input of shape "
        f"{shape}{expected}. Check the batch (e.g. channel count, image size) against the model. Paddle: {first_line}"
    ) from exc


def _checkpoint_files(directory: str) -> list[str]:
    """The finished ``*.ckpt`` files in ``directory`` (none when it does not exist)."""
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, f) for f in os.listdir(directory)
            if f.endswith(".ckpt") and not f.startswith(".tmp-")]


def _set_sampler_epoch(loader: Iterable, epoch: int) -> None:
    for attr in ("batch_sampler", "sampler"):
        sampler = getattr(loader, attr, None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def _to_device(batch: Any, device: str) -> Any:
    """Move the batch's tensors to ``device`` (a no-op on CPU, where loaders already put them)."""
    if device == "cpu":
        return batch
    if isinstance(batch, paddle.Tensor):
        return batch if str(batch.place).lower().startswith("place(gpu") else batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch
