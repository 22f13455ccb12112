"""The evaluation loops: one pass of validation or test (metrics), and prediction (outputs).

Each takes the Trainer, whose hook dispatch (``_call_hook``, ``_span``) and metric publishing
(``_publish``) it uses; the hooks fire as ``qtrainer/hooks.py`` documents.
"""
from __future__ import annotations

from typing import Any, Iterable

import paddle

from qtrainer.data.iteration import close_iterator, guard_iterator
from qtrainer.loops.batch import batch_size, raise_layer_error, to_device
from qtrainer.results import LoggedResults

__all__ = ["evaluation_epoch", "predict_epoch"]


def evaluation_epoch(trainer, stage: str, loader: Iterable, num_batches: float) -> dict[str, float]:
    """One pass of ``stage`` (``"validation"`` or ``"test"``) over at most ``num_batches``; returns
    the epoch metrics (published to callbacks, and to the loggers unless sanity checking)."""
    module = trainer.module
    step_fn = getattr(module, f"{stage}_step", None)
    was_training = module.training
    module.eval()
    results = LoggedResults()
    trainer._log_context, trainer._results = stage, results
    call = trainer._call_hook
    try:
        with trainer._span(f"on_{stage}_start", f"on_{stage}_end"):
            call(f"on_{stage}_epoch_start")
            with paddle.no_grad():
                iterator = guard_iterator(iter(loader))
                for batch_idx, batch in enumerate(iterator):
                    if batch_idx >= num_batches:
                        break
                    trainer._current_batch_size = batch_size(batch)
                    batch = to_device(batch, trainer.device)
                    call(f"on_{stage}_batch_start", batch, batch_idx)
                    try:
                        with trainer.precision.autocast():
                            outputs = step_fn(batch, batch_idx) if step_fn is not None else None
                    except ValueError as exc:
                        raise_layer_error(exc, module, f"{stage}_step")
                        raise
                    call(f"on_{stage}_batch_end", outputs, batch, batch_idx)
                close_iterator(iterator)
            call(f"on_{stage}_epoch_end")
            metrics = trainer._publish(results.epoch_values(trainer.strategy.all_reduce), trainer.global_step,
                                       to_loggers=not trainer.sanity_checking)
    finally:
        if was_training:
            module.train()
    return metrics


def predict_epoch(trainer, loader: Iterable, num_batches: float) -> list[Any]:
    """``predict_step`` over at most ``num_batches`` of ``loader``; returns its outputs."""
    module = trainer.module
    call = trainer._call_hook
    predictions = []
    module.eval()
    with trainer._span("on_predict_start", "on_predict_end"):
        call("on_predict_epoch_start")
        with paddle.no_grad():
            for batch_idx, batch in enumerate(guard_iterator(iter(loader))):
                if batch_idx >= num_batches:
                    break
                batch = to_device(batch, trainer.device)
                call("on_predict_batch_start", batch, batch_idx)
                try:
                    with trainer.precision.autocast():
                        outputs = module.predict_step(batch, batch_idx)
                except ValueError as exc:
                    raise_layer_error(exc, module, "predict_step")
                    raise
                call("on_predict_batch_end", outputs, batch, batch_idx)
                predictions.append(outputs)
        call("on_predict_epoch_end")
    return predictions
