"""The ``Trainer``: its arguments, ``fit``/``validate``/``test``/``predict``, hook dispatch and logging.

The loops are in ``qtrainer/loops/``, checkpoint dump/restore in ``qtrainer/checkpointing.py``, the
run's progress in ``trainer.state`` (``qtrainer/state.py``), processes in ``qtrainer/strategies.py``
and ``qtrainer/spawn.py``. The order in which hooks fire is documented in ``qtrainer/hooks.py``.
The Trainer knows nothing about quantization; quantization callbacks use the ``configure_model``
hook, which runs before the optimizer is built and before checkpoint weights are restored.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterable

import numpy as np
import paddle

import qtrainer.checkpointing as checkpointing
from qtrainer._checks import check_limit_batches, check_positive_int
from qtrainer.callbacks.base import Callback
from qtrainer.data.iteration import limited_length
from qtrainer.device import default_num_threads, resolve_device, resolve_precision, set_num_threads
from qtrainer.hooks import MODULE_HOOKS, overrides_hook
from qtrainer.loggers.base import Logger
from qtrainer.loops.evaluation import evaluation_epoch, predict_epoch
from qtrainer.loops.fit import FitLoop
from qtrainer.module import Module
from qtrainer.optim import parse_optimizers
from qtrainer.paths import check_writable_dir
from qtrainer.results import LoggedResults, to_float
from qtrainer.rng import seed_everything
from qtrainer.state import StateField, TrainerState
from qtrainer.strategies import SingleProcess, agree_on_batches, resolve_strategy

__all__ = ["Trainer"]

log = logging.getLogger(__name__)


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
            ``devices > 1``), ``"ddp"``, ``"single_device"``, or a ``qtrainer.strategies`` instance
            (see ``qtrainer.spawn`` for launching several processes).
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
        check_positive_int("max_epochs", max_epochs, allow_none=True)
        check_positive_int("max_steps", max_steps, allow_none=True)
        check_positive_int("accumulate_grad_batches", accumulate_grad_batches)
        check_positive_int("check_val_every_n_epoch", check_val_every_n_epoch)
        check_positive_int("log_every_n_steps", log_every_n_steps)
        for name, value in (("limit_train_batches", limit_train_batches), ("limit_val_batches", limit_val_batches),
                            ("limit_test_batches", limit_test_batches), ("limit_predict_batches", limit_predict_batches)):
            check_limit_batches(name, value)
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
        check_positive_int("num_threads", num_threads, allow_none=True)

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
        check_writable_dir(self.default_root_dir, "default_root_dir")
        self.loggers = self._make_loggers(logger)
        self.callbacks = self._make_callbacks(list(callbacks or []), enable_progress_bar, enable_checkpointing)

        self.state = TrainerState()  # the run's progress: what checkpoints and spawned ranks carry
        self._clear_run_objects()
        self.num_training_batches: float = 0
        self.num_val_batches: float = 0
        self.num_test_batches: float = 0
        self.num_predict_batches: float = 0
        self._resume: dict[str, Any] | None = None  # a checkpoint's batches done and RNG, for the next epoch
        self._train_results = LoggedResults()
        self._log_context = "train_step"
        self._current_batch_size = 1
        self._hook_receivers: dict[str, tuple[tuple[Callback, ...], bool]] = {}
        self._hook_receivers_for: tuple = ()
        self._last_synced: tuple[paddle.Tensor, int, float] | None = None

    # Progress, read and written by callbacks as trainer attributes (they live in self.state).
    current_epoch = StateField("epoch")
    global_step = StateField("global_step")
    should_stop = StateField("should_stop")
    sanity_checking = StateField("sanity_checking")
    failed = StateField("failed")
    state_stage = StateField("stage")
    log_history = StateField("log_history")
    callback_metrics = StateField("callback_metrics")
    progress_bar_metrics = StateField("progress_bar_metrics")
    logged_metrics = StateField("logged_metrics")

    def _clear_run_objects(self) -> None:
        """Forget the objects of a run (also for the copy that spawned processes start from)."""
        self.module: Module | None = None
        self.model = None
        self.optimizers: list = []
        self.lr_schedulers: list[dict[str, Any]] = []
        self.grad_scaler = None
        self.train_dataloader = None
        self.val_dataloaders = None
        self._results: LoggedResults | None = None

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

    def _make_callbacks(self, callbacks: list[Callback], progress_bar: bool, checkpoint: bool) -> list[Callback]:
        from qtrainer.callbacks import ModelCheckpoint, TQDMProgressBar

        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks must be qtrainer Callback instances; got {type(callback).__name__}")
        if not checkpoint and any(isinstance(c, ModelCheckpoint) for c in callbacks):
            raise ValueError("a ModelCheckpoint was passed in callbacks but enable_checkpointing=False; drop one of them")
        self._default_callbacks: tuple[Callback, ...] = ()  # replaced by a user's callback of the same kind
        if checkpoint and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
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

    def log_image(self, tag: str, image: Any, step: int | None = None) -> None:
        """Send an ``HxWx3`` uint8 picture to every logger that draws them (rank 0 only)."""
        if not self.is_global_zero:
            return
        step = self.global_step if step is None else step
        for logger in self.loggers:
            logger.log_image(tag, np.asarray(image), step)

    def log_layout(self, layout: dict[str, dict[str, list]]) -> None:
        """Send a chart layout of the scalars (see ``Logger.log_layout``) to every logger (rank 0 only)."""
        if not self.is_global_zero:
            return
        for logger in self.loggers:
            logger.log_layout(layout)

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
            metrics = evaluation_epoch(self, "validation", self.val_dataloaders, self.num_val_batches)
        finally:
            self._results, self._log_context = results, context
        self.state.record(metrics)
        return metrics

    def save_checkpoint(self, filepath: str) -> None:
        """Write a full checkpoint atomically (rank 0 writes; every rank must call this and waits for it)."""
        checkpointing.save_checkpoint(self, filepath)

    # -- run skeleton --------------------------------------------------------------------
    def _spawn(self, stage: str, model: Module, **kwargs: Any) -> Any:
        """Run ``stage`` on the processes the strategy spawns (see ``qtrainer.spawn``)."""
        from qtrainer.spawn import spawn_run

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
        self.callbacks = self._with_run_callbacks(extra)
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
            checkpoint = checkpointing.restore(self, ckpt_path, resume=True)
        else:
            state = self.state
            state.epoch, state.global_step, state.log_history, self._resume = 0, 0, [], None
            state.data_seed = self.seed if self.seed is not None else int(np.random.randint(0, 2**31 - 1))
        self.model = self.strategy.wrap_model(module)
        self.optimizers, self.lr_schedulers = parse_optimizers(module.configure_optimizers())
        self.grad_scaler = paddle.amp.GradScaler() if self.precision.needs_grad_scaler else None
        if checkpoint is not None:
            checkpointing.restore_training_state(self, checkpoint)
        for optimizer in self.optimizers:  # gradients left by an earlier run would hide a loss that reaches none
            optimizer.clear_grad(set_to_zero=False)

        self.num_training_batches = agree_on_batches(
            self.strategy, "train", limited_length(train_loader, self.limit_train_batches, "limit_train_batches"))
        if self.num_training_batches == 0:
            raise ValueError("the training loader yields no batches (empty dataset or limit_train_batches=0)")
        self.num_val_batches = (
            limited_length(val_loader, self.limit_val_batches, "limit_val_batches") if val_loader is not None else 0
        )
        if val_loader is not None:
            self.num_val_batches = agree_on_batches(self.strategy, "validation", self.num_val_batches)
        if self.is_global_zero:
            hparams = getattr(module, "hparams", None)
            if hparams:
                for logger in self.loggers:
                    logger.log_hyperparams(dict(hparams))
        loop = FitLoop(self)
        with self._span("on_fit_start", "on_fit_end"):
            if val_loader is not None and self.num_val_batches and self.num_sanity_val_steps:
                loop.sanity_check(val_loader)
            with self._span("on_train_start", "on_train_end"):
                loop.run(train_loader, val_loader)
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
            names = [c.monitor for c in watchers if c.monitor] + ["val_loss"]
            chosen = next((name for name in names if name in final), None)
            if chosen is not None:
                final["hp_metric"] = final[chosen]
        return final

    def _evaluate(self, stage: str, dataloaders: Iterable | None, ckpt_path: str | None) -> list[dict[str, float]]:
        loader = dataloaders if dataloaders is not None else getattr(self.module, f"{'val' if stage == 'validation' else stage}_dataloader")()
        if loader is None:
            raise ValueError(f"no {stage} data: pass dataloaders or define the module's "
                             f"{'val' if stage == 'validation' else stage}_dataloader()")
        if not hasattr(type(self.module), f"{stage}_step"):
            raise NotImplementedError(f"{type(self.module).__name__} has no {stage}_step(batch, batch_idx)")
        if ckpt_path is not None:
            checkpointing.restore(self, ckpt_path, resume=False)
        loader = self.strategy.prepare_dataloader(loader, stage)
        limit = self.limit_val_batches if stage == "validation" else self.limit_test_batches
        num_batches = limited_length(loader, limit, "limit_val_batches" if stage == "validation" else "limit_test_batches")
        num_batches = agree_on_batches(self.strategy, stage, num_batches)
        if stage == "validation":
            self.num_val_batches = num_batches
        else:
            self.num_test_batches = num_batches
        return [evaluation_epoch(self, stage, loader, num_batches)]

    def _predict(self, dataloaders: Iterable | None, ckpt_path: str | None) -> list[Any]:
        module = self.module
        loader = dataloaders if dataloaders is not None else module.predict_dataloader()
        if loader is None:
            raise ValueError("no predict data: pass dataloaders or define the module's predict_dataloader()")
        if ckpt_path is not None:
            checkpointing.restore(self, ckpt_path, resume=False)
        self.num_predict_batches = limited_length(loader, self.limit_predict_batches, "limit_predict_batches")
        return predict_epoch(self, loader, self.num_predict_batches)
