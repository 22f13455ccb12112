"""``Module``: a ``paddle.nn.Layer`` that knows how to train itself."""
from __future__ import annotations

import copy
import logging
from typing import Any

import paddle
from paddle import nn

__all__ = ["Module"]

log = logging.getLogger(__name__)


class Module(nn.Layer):
    """Base class for models trained by :class:`qtrainer.Trainer`.

    Implement ``training_step`` (return a scalar loss tensor, or a dict with ``"loss"``) and
    ``configure_optimizers``; optionally ``validation_step``, ``test_step``, ``predict_step``,
    ``train_dataloader``/``val_dataloader``/``test_dataloader``/``predict_dataloader`` and any
    hook listed in ``qtrainer.hooks``. ``configure_optimizers`` may return an optimizer, a tuple
    ``(optimizer, lr_scheduler)``, or a dict ``{"optimizer": ..., "lr_scheduler": ...}`` where the
    scheduler is an ``LRScheduler`` or ``{"scheduler": s, "interval": "step"|"epoch",
    "frequency": n}``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer = None

    @property
    def trainer(self):
        """The Trainer running this module (None outside a run)."""
        return self._trainer

    def __deepcopy__(self, memo: dict) -> "Module":
        """Copy the module without its Trainer (a copy, e.g. for export, is not attached to a run)."""
        if self._trainer is not None:
            memo[id(self._trainer)] = None
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    # -- what subclasses implement --------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int):
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch, batch_idx)")

    def configure_optimizers(self):
        raise NotImplementedError(
            f"{type(self).__name__} must implement configure_optimizers() returning an optimizer, "
            "(optimizer, lr_scheduler), or {'optimizer': ..., 'lr_scheduler': ...}"
        )

    def predict_step(self, batch: Any, batch_idx: int):
        """Default: the forward pass on the batch's first element."""
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(inputs)

    def train_dataloader(self):
        return None

    def val_dataloader(self):
        return None

    def test_dataloader(self):
        return None

    def predict_dataloader(self):
        return None

    # -- logging -------------------------------------------------------------------------
    def log(
        self,
        name: str,
        value: Any,
        prog_bar: bool = False,
        logger: bool = True,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str = "mean",
        batch_size: int | None = None,
    ) -> None:
        """Record a metric.

        Defaults follow Lightning: inside ``training_step`` a value is logged per step
        (``on_step=True, on_epoch=False``); in validation/test it is reduced per epoch.
        ``reduce_fx`` is ``"mean"`` (weighted by ``batch_size``, taken from the batch when not
        given), ``"sum"``, ``"max"`` or ``"min"``. With both ``on_step`` and ``on_epoch`` the
        values are recorded as ``name_step`` and ``name_epoch``.
        """
        if self._trainer is None:
            log.warning("self.log(%r) called outside a Trainer run; ignored", name)
            return
        self._trainer._log_from_module(
            name, value, prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch,
            reduce_fx=reduce_fx, batch_size=batch_size,
        )

    def log_dict(self, metrics: dict[str, Any], **kwargs: Any) -> None:
        """``log`` for each item of ``metrics``."""
        for name, value in metrics.items():
            self.log(name, value, **kwargs)

    # -- hooks (no-ops; see qtrainer.hooks for the order) ----------------------------------
    def setup(self, stage: str) -> None: ...
    def configure_model(self) -> None: ...
    def teardown(self, stage: str) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None: ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_before_backward(self, loss: paddle.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer) -> None: ...
    def on_before_zero_grad(self, optimizer) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
