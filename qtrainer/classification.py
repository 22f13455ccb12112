"""``ClassificationModule``: train any plain ``paddle.nn.Layer`` classifier without subclassing."""
from __future__ import annotations

from typing import Any, Callable

import paddle
import paddle.nn.functional as F
from paddle import nn
from paddle.optimizer.lr import LRScheduler

from qtrainer.module import Module

__all__ = ["ClassificationModule"]

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULERS = (None, "cosine", "step")


class ClassificationModule(Module):
    """Cross-entropy training of a classifier ``net`` (logits out), with top-1/top-5 accuracy.

    Args:
        net: the classifier, e.g. ``paddle.vision.models.mobilenet_v1(num_classes=10)``.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, ``"momentum"``, or a callable
            ``(parameters, learning_rate) -> Optimizer``.
        lr: the base learning rate.
        weight_decay: L2 (``sgd``/``momentum``/``adam``) or decoupled (``adamw``) weight decay.
        momentum: momentum of ``"momentum"``.
        scheduler: None, ``"cosine"``, ``"step"`` (×0.1 every third of the run) or a callable
            ``(lr) -> LRScheduler``. The named schedules span ``Trainer.max_steps`` stepping every
            optimizer step when it is set, else ``Trainer.max_epochs`` stepping every epoch.
        label_smoothing: cross-entropy label smoothing in [0, 1).

    Logs ``train_loss`` (progress bar), ``train_acc``, ``val_loss``, ``val_acc``, ``val_acc_top5``
    (and ``test_*``). Batches are ``(images, labels)``.
    """

    def __init__(
        self,
        net: nn.Layer,
        optimizer: str | Callable[..., paddle.optimizer.Optimizer] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | Callable[[float], LRScheduler] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Layer):
            raise TypeError(f"net must be a paddle.nn.Layer, got {type(net).__name__}")
        if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {OPTIMIZERS} or a callable")
        if isinstance(scheduler, str) and scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r} is not supported; use one of {SCHEDULERS} or a callable")
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise ValueError(f"lr={lr!r}: use a positive number")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r}: use a value in [0, 1)")
        self.net = net
        self.optimizer_name = optimizer
        self.lr, self.weight_decay, self.momentum = float(lr), float(weight_decay), float(momentum)
        self.scheduler_name = scheduler
        self.label_smoothing = float(label_smoothing)
        self.hparams = {
            "net": type(net).__name__, "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom"),
            "lr": self.lr, "weight_decay": self.weight_decay, "label_smoothing": self.label_smoothing,
            "scheduler": scheduler if scheduler is None or isinstance(scheduler, str) else "custom",
        }

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.net(x)

    def _shared_step(self, batch: Any, prefix: str) -> paddle.Tensor:
        images, labels = batch[0], batch[1]
        labels = labels.reshape([-1]).astype("int64")
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if prefix == "train" else 0.0)
        top1 = (logits.argmax(axis=-1) == labels).astype("float32").mean()
        self.log(f"{prefix}_loss", loss, prog_bar=prefix != "test")
        self.log(f"{prefix}_acc", top1, prog_bar=prefix == "val")
        if prefix != "train" and logits.shape[-1] >= 5:
            top5 = paddle.topk(logits, k=5, axis=-1)[1]
            hit5 = (top5 == labels.unsqueeze(-1)).astype("float32").sum(axis=-1).mean()
            self.log(f"{prefix}_acc_top5", hit5)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> paddle.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> paddle.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> paddle.Tensor:
        return self._shared_step(batch, "test")

    def configure_optimizers(self):
        learning_rate: float | LRScheduler = self.lr
        interval = "epoch"
        if callable(self.scheduler_name):
            learning_rate = self.scheduler_name(self.lr)
        elif self.scheduler_name is not None:
            span, interval = self._schedule_span()
            if self.scheduler_name == "cosine":
                learning_rate = paddle.optimizer.lr.CosineAnnealingDecay(self.lr, T_max=span)
            else:
                learning_rate = paddle.optimizer.lr.StepDecay(self.lr, step_size=max(1, span // 3), gamma=0.1)
        params = self.parameters()
        if callable(self.optimizer_name):
            optimizer = self.optimizer_name(params, learning_rate)
        elif self.optimizer_name == "adam":
            optimizer = paddle.optimizer.Adam(learning_rate, parameters=params, weight_decay=self.weight_decay or None)
        elif self.optimizer_name == "adamw":
            optimizer = paddle.optimizer.AdamW(learning_rate, parameters=params, weight_decay=self.weight_decay)
        elif self.optimizer_name == "sgd":
            optimizer = paddle.optimizer.SGD(learning_rate, parameters=params, weight_decay=self.weight_decay or None)
        else:
            optimizer = paddle.optimizer.Momentum(learning_rate, momentum=self.momentum, parameters=params,
                                                  weight_decay=self.weight_decay or None)
        if isinstance(learning_rate, LRScheduler):
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": learning_rate, "interval": interval}}
        return optimizer

    def _schedule_span(self) -> tuple[int, str]:
        """(length, interval) of a named schedule: the run's optimizer steps when capped, else its epochs."""
        trainer = self.trainer
        if trainer is not None and trainer.max_steps is not None:
            return trainer.max_steps, "step"
        return (trainer.max_epochs if trainer is not None else None) or 1, "epoch"
