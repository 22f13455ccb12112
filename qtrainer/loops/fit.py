"""The training loop of ``fit``: epochs, batches, optimizer steps, in-fit validation and epoch ends.

``FitLoop(trainer).run(train_loader, val_loader)`` runs after the Trainer has built the optimizers
and restored any checkpoint; the hooks fire as ``qtrainer/hooks.py`` documents. Progress lives in
``trainer.state`` (``qtrainer.state.TrainerState``); a pending mid-epoch resume in ``trainer._resume``.
"""
from __future__ import annotations

import collections.abc
import logging
import math
from typing import Any, Iterable

import paddle

from qtrainer.data.iteration import close_iterator, guard_iterator
from qtrainer.data.sharding import set_sampler_epoch
from qtrainer.loops.batch import batch_size, raise_layer_error, to_device
from qtrainer.loops.evaluation import evaluation_epoch
from qtrainer.rng import restore_paddle_rng_state, seed_data_rngs

__all__ = ["FitLoop"]

log = logging.getLogger(__name__)


class FitLoop:
    """One ``fit`` call's training: ``run`` until ``max_epochs``/``max_steps`` or a stop decision."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.state = trainer.state
        self.accumulated = 0  # micro-batches since the last optimizer step
        self.gradients_checked = False  # set after the fit's first step found a gradient

    # -- the loop -----------------------------------------------------------------------------
    def sanity_check(self, val_loader: Iterable) -> None:
        """A few validation batches before training; their metrics are discarded."""
        trainer, state = self.trainer, self.state
        state.sanity_checking = True
        saved = (dict(state.callback_metrics), dict(state.progress_bar_metrics))
        try:
            with trainer._span("on_sanity_check_start", "on_sanity_check_end"):
                evaluation_epoch(trainer, "validation", val_loader,
                                 min(trainer.num_sanity_val_steps, trainer.num_val_batches))
        finally:
            state.sanity_checking = False
            state.callback_metrics, state.progress_bar_metrics = saved

    def run(self, train_loader: Iterable, val_loader: Iterable | None) -> None:
        trainer, state = self.trainer, self.state
        module = trainer.module
        val_every = self._val_check_batches()
        while not self._done():
            set_sampler_epoch(train_loader, state.epoch)
            seed_data_rngs(state.data_seed, state.epoch)
            resume, trainer._resume = trainer._resume, None
            if resume is not None and not resume["batches_done"]:
                restore_paddle_rng_state(resume["rng"])
            if resume is None or not resume["batches_done"]:
                trainer._train_results.reset()
            state.epoch_finished = False
            module.train()
            trainer._log_context, trainer._results = "train_step", trainer._train_results
            trainer._call_hook("on_train_epoch_start")
            iterator = guard_iterator(iter(train_loader))
            batch_idx = 0
            if resume is not None and resume["batches_done"]:
                for _ in range(resume["batches_done"]):
                    next(iterator)
                batch_idx = resume["batches_done"]
                restore_paddle_rng_state(resume["rng"])
            # A step checkpoint is written after the validation of its batch, so a run resumed
            # from it has already validated there.
            validated_at_end = batch_idx > 0 and batch_idx % val_every == 0 and self._validation_due()
            while batch_idx < trainer.num_training_batches:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                stepped = self.training_batch(batch, batch_idx)
                batch_idx += 1
                state.batches_done = batch_idx
                validated_at_end = False
                if batch_idx % val_every == 0 and self._validation_due():
                    self.validate(val_loader)
                    validated_at_end = True
                if stepped:
                    trainer._call_hook("on_step_checkpoint")
                if trainer.max_steps is not None and state.global_step >= trainer.max_steps:
                    break
            close_iterator(iterator)
            if batch_idx == 0:
                self._empty_epoch(train_loader)
                validated_at_end = True  # nothing changed since the last validation
            if not validated_at_end and isinstance(trainer.val_check_interval, float) and self._validation_due():
                self.validate(val_loader)
            completed = not (trainer.max_steps is not None and state.global_step >= trainer.max_steps
                             and batch_idx < trainer.num_training_batches)
            self.end_epoch(completed)

    def _done(self) -> bool:
        trainer, state = self.trainer, self.state
        if state.should_stop:
            return True
        if trainer.max_steps is not None and state.global_step >= trainer.max_steps:
            return True
        return trainer.max_epochs is not None and state.epoch >= trainer.max_epochs

    def _val_check_batches(self) -> float:
        trainer = self.trainer
        if isinstance(trainer.val_check_interval, int):
            return trainer.val_check_interval
        if math.isinf(trainer.num_training_batches):
            if trainer.val_check_interval != 1.0:
                raise ValueError("val_check_interval as a fraction needs a loader with a length; "
                                 "use an int number of batches")
            return math.inf
        return max(1, int(trainer.num_training_batches * trainer.val_check_interval))

    def _validation_due(self) -> bool:
        trainer = self.trainer
        return bool(trainer.val_dataloaders is not None and trainer.num_val_batches
                    and (self.state.epoch + 1) % trainer.check_val_every_n_epoch == 0)

    def validate(self, val_loader: Iterable) -> None:
        """The validation block inside the training epoch; training resumes afterwards."""
        trainer = self.trainer
        self.state.record(evaluation_epoch(trainer, "validation", val_loader, trainer.num_val_batches))
        trainer.module.train()
        trainer._log_context, trainer._results = "train_step", trainer._train_results

    def _empty_epoch(self, train_loader: Iterable) -> None:
        """An epoch in which the training loader yielded nothing: an error when nothing has been
        trained in this fit, else (an iterator exhausted by its first pass) a warning, and the fit
        stops instead of running the remaining epochs empty."""
        trainer, epoch = self.trainer, self.state.epoch
        kind = type(train_loader).__name__
        kind += (f", {trainer.num_training_batches} batches expected" if not math.isinf(trainer.num_training_batches)
                 else ", without len()")
        if not self.gradients_checked:
            raise ValueError(
                f"the training loader ({kind}) yielded no batches in epoch {epoch}: "
                "nothing was trained; check the dataset (empty, or filtered to nothing)")
        one_shot = isinstance(train_loader, collections.abc.Iterator)  # not iter(): that would start a loader
        log.warning(
            "the training loader (%s) yielded no batches in epoch %d%s; stopping the fit after %d epoch(s) "
            "instead of running the remaining ones empty", kind, epoch,
            " (an iterator or generator is used up by its first pass; pass a re-iterable loader such as a list "
            "or a paddle.io.DataLoader)" if one_shot else "", epoch)
        self.state.should_stop = True

    # -- one batch ------------------------------------------------------------------------------
    def training_batch(self, batch: Any, batch_idx: int) -> bool:
        """One forward/backward (and optimizer step when due); True when the optimizer stepped."""
        trainer, state = self.trainer, self.state
        module, call = trainer.module, trainer._call_hook
        trainer._current_batch_size = batch_size(batch)
        batch = to_device(batch, trainer.device)
        call("on_train_batch_start", batch, batch_idx)
        last_batch = batch_idx + 1 == trainer.num_training_batches
        # gradients are reduced across ranks only on the micro-batch that steps the optimizer
        sync = self.accumulated + 1 >= trainer.accumulate_grad_batches or last_batch
        try:
            with trainer.precision.autocast():
                outputs = trainer.strategy.training_step(trainer.model, batch, batch_idx, sync_gradients=sync)
        except ValueError as exc:
            raise_layer_error(exc, module, "training_step")
            raise
        loss = self._extract_loss(outputs)
        if not self.gradients_checked and loss.stop_gradient:
            raise ValueError(
                f"{type(module).__name__}.training_step returned a loss with stop_gradient=True (was it .detach()ed, "
                "computed under paddle.no_grad(), or are all parameters frozen?): no gradient reached any "
                "parameter, so training would change nothing; return the loss as computed from the model's output")
        loss_value = trainer._to_host(loss, "loss")  # shared with the module's self.log of the same tensor
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"the training loss is {loss_value} at epoch {state.epoch}, batch {batch_idx} "
                f"(global step {state.global_step}); stopping. No checkpoint with non-finite weights is written."
            )
        state.running_loss.append(loss_value)
        call("on_before_backward", loss)
        accumulate = trainer.accumulate_grad_batches
        scaled = loss / accumulate if accumulate > 1 else loss
        (trainer.grad_scaler.scale(scaled) if trainer.grad_scaler is not None else scaled).backward()
        call("on_after_backward")
        self.accumulated += 1
        stepped = False
        if self.accumulated >= accumulate or last_batch:
            if not self.gradients_checked:
                self._check_gradients_reached()
            self.optimizer_step()
            stepped = True
        call("on_train_batch_end", outputs, batch, batch_idx)
        trainer._last_synced = None  # do not keep this step's tensors alive
        state.progress_bar_metrics["loss"] = sum(state.running_loss) / len(state.running_loss)
        log_now = stepped and state.global_step % trainer.log_every_n_steps == 0
        trainer._publish(trainer._train_results.step_values(), state.global_step, to_loggers=log_now)
        return stepped

    def _extract_loss(self, outputs: Any) -> paddle.Tensor:
        where = f"{type(self.trainer.module).__name__}.training_step"
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
        module = self.trainer.module
        trainable = [p for p in module.parameters() if not p.stop_gradient]
        if not any(p.grad is not None for p in trainable):
            why = (f"none of its {len(trainable)} trainable parameters" if trainable
                   else "it has no trainable parameters (all have stop_gradient=True)")
            raise ValueError(
                f"no gradient reached any parameter of {type(module).__name__} after the first backward: {why} "
                "received one, so training would change nothing; the loss returned by training_step must be "
                "computed from the model's trainable parameters")
        self.gradients_checked = True

    def optimizer_step(self) -> None:
        trainer = self.trainer
        scaler, clip = trainer.grad_scaler, trainer.gradient_clip_val
        parameters = None  # walking a large model's parameters costs; only clipping needs them
        for optimizer in trainer.optimizers:
            trainer._call_hook("on_before_optimizer_step", optimizer)
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip is not None:
                if parameters is None:
                    parameters = [p for p in trainer.module.parameters() if not p.stop_gradient]
                with_grad = [p for p in parameters if p.grad is not None]
                if trainer.gradient_clip_algorithm == "norm":
                    paddle.nn.utils.clip_grad_norm_(with_grad, clip)
                else:
                    paddle.nn.utils.clip_grad_value_(with_grad, clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            trainer._call_hook("on_before_zero_grad", optimizer)
            optimizer.clear_grad()
        self.accumulated = 0
        self.state.global_step += 1
        for config in trainer.lr_schedulers:
            if config["interval"] == "step" and self.state.global_step % config["frequency"] == 0:
                config["scheduler"].step()

    # -- epoch end --------------------------------------------------------------------------------
    def end_epoch(self, completed: bool) -> None:
        """Epoch-end hooks, epoch metrics, schedulers, the epoch checkpoint point and the stop decision.

        An epoch cut short by ``max_steps`` is checkpointed as unfinished, so a resumed run with
        a larger ``max_steps`` continues with the rest of that epoch.
        """
        trainer, state = self.trainer, self.state
        results, all_reduce = trainer._train_results, trainer.strategy.all_reduce
        trainer._publish(results.epoch_values(all_reduce), state.global_step, to_loggers=False)
        trainer._log_context = "train_epoch_end"
        trainer._call_hook("on_train_epoch_end")
        trainer._log_context = "train_step"
        metrics = trainer._publish(results.epoch_values(all_reduce), state.global_step, to_loggers=True,
                                   extra={"epoch": float(state.epoch)})
        state.record(metrics)
        for config in trainer.lr_schedulers:
            if completed and config["interval"] == "epoch" and (state.epoch + 1) % config["frequency"] == 0:
                config["scheduler"].step()
        state.epoch_finished = completed
        trainer._call_hook("on_epoch_checkpoint")
        state.should_stop = trainer.strategy.reduce_boolean_decision(state.should_stop)
        if completed:
            state.epoch += 1
            state.batches_done = 0
        state.epoch_finished = False
