"""qtrainer/loops/fit.py: limits, validation schedule, clipping, the loss, and training that trains nothing."""
from __future__ import annotations

import math
import os

import numpy as np

import paddle
import pytest

from qtrainer import Callback, Trainer
from qtrainer.callbacks import ModelCheckpoint

from helpers import TinyModule, make_loader, quiet_trainer_kwargs


def test_max_steps_and_limits(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=5, limit_train_batches=0.5))
    trainer.fit(tiny_module, make_loader())
    assert trainer.global_step == 5 and trainer.num_training_batches == 4


def test_val_check_interval_and_every_n_epoch(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=4, val_check_interval=0.5,
                                             check_val_every_n_epoch=2, num_sanity_val_steps=0))
    trainer.fit(tiny_module, make_loader(), make_loader(shuffle=False))
    val_steps = [r["step"] for r in trainer.log_history if "val_loss" in r]
    assert val_steps == [12, 16, 28, 32]


def test_gradient_clipping_bounds_the_update(tmp_path):
    class Sgd(TinyModule):
        def configure_optimizers(self):
            return paddle.optimizer.SGD(1.0, parameters=self.parameters())

    paddle.seed(0)
    module = Sgd()
    before = [p.numpy().copy() for p in module.parameters()]
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1, gradient_clip_val=0.01))
    trainer.fit(module, make_loader())
    delta = math.sqrt(sum(float(((p.numpy() - b) ** 2).sum()) for p, b in zip(module.parameters(), before)))
    assert 0 < delta <= 0.01 + 1e-6


@pytest.mark.parametrize("returned, error, message", [
    (None, ValueError, "returned None"),
    ({"not_loss": 1}, ValueError, "a dict without a loss"),
    ("vector", ValueError, r"loss of shape \[8\]"),
    (3.0, TypeError, "loss of type float"),
])
def test_bad_training_step_returns(tmp_path, returned, error, message):
    class Bad(TinyModule):
        def training_step(self, batch, batch_idx):
            if returned == "vector":
                return paddle.ones([8])
            return returned

    with pytest.raises(error, match=message):
        Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1)).fit(Bad(), make_loader())


def test_nan_loss_stops_with_epoch_and_step_and_writes_no_checkpoint(tmp_path):
    class Diverging(TinyModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 3 else loss

    ckpt_dir = tmp_path / "ckpt"
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True,
                                             callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=1,
                                                                        save_top_k=-1)]))
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 0, batch 3 .global step 3"):
        trainer.fit(Diverging(), make_loader())
    assert sorted(os.listdir(ckpt_dir)) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]


def test_a_loss_of_shape_one_trains(tmp_path):
    class ShapeOne(TinyModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx).reshape([1])

    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(ShapeOne(), make_loader())
    assert trainer.global_step == 2 and math.isfinite(trainer.progress_bar_metrics["loss"])


def test_a_logged_and_returned_loss_is_copied_to_the_host_once_per_step(tmp_path, tiny_module, monkeypatch):
    returned, copies = [], {}
    original_item = paddle.Tensor.item

    def counting_item(tensor, *args):
        copies[id(tensor)] = copies.get(id(tensor), 0) + 1
        return original_item(tensor, *args)

    class Recording(TinyModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)  # logs train_loss, then returns the same tensor
            returned.append(loss)
            return loss

    monkeypatch.setattr(paddle.Tensor, "item", counting_item)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(Recording(), make_loader())
    assert len(returned) == 4
    assert [copies.get(id(loss), 0) for loss in returned] == [1, 1, 1, 1]


def test_a_loss_changed_in_place_after_logging_is_read_again(tmp_path):
    class Doubled(TinyModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)  # logs train_loss
            loss.scale_(2.0)
            return loss

    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(Doubled(), make_loader())
    logged = trainer.callback_metrics["train_loss_step"]
    assert trainer.progress_bar_metrics["loss"] == pytest.approx(2 * logged)


def test_a_detached_loss_is_an_error(tmp_path):
    class Detached(TinyModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx).detach()

    with pytest.raises(ValueError, match=r"stop_gradient=True .*was it .detach\(\)ed.*"
                                         r"no gradient reached any parameter"):
        Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=2)).fit(Detached(), make_loader())


def test_a_loss_that_reaches_no_parameter_is_an_error(tmp_path):
    class InputsOnly(TinyModule):
        def training_step(self, batch, batch_idx):
            x = batch[0]
            x.stop_gradient = False  # the loss needs gradients, but of the data, not of the model
            return (x * 2.0).mean()

    module = InputsOnly()
    before = [p.numpy().copy() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"no gradient reached any parameter of InputsOnly.*none of its 4 trainable"):
        Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=2)).fit(module, make_loader())
    assert all(np.array_equal(b, p.numpy()) for b, p in zip(before, module.parameters()))


class _NoBatches:
    """An iterable without ``len`` that yields nothing."""

    def __iter__(self):
        return iter(())


def test_an_empty_loader_without_len_is_an_error(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path))  # max_epochs defaults to 1000
    with pytest.raises(ValueError, match=r"loader \(_NoBatches, without len\(\)\) yielded no batches in epoch 0"):
        trainer.fit(tiny_module, _NoBatches())
    assert trainer.current_epoch == 0


def test_a_one_shot_generator_stops_the_fit_with_a_warning_after_its_pass(tmp_path, tiny_module, caplog):
    epochs = []

    class Epochs(Callback):
        def on_train_epoch_start(self, trainer, module):
            epochs.append(trainer.current_epoch)

    batches = list(make_loader())
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=3, callbacks=[Epochs()]))
    with caplog.at_level("WARNING", logger="qtrainer.loops.fit"):
        trainer.fit(tiny_module, (b for b in batches))
    assert trainer.global_step == len(batches) and epochs == [0, 1]
    assert "yielded no batches in epoch 1 (an iterator or generator is used up by its first pass" in caplog.text
