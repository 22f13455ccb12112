"""Trainer behaviour: loops, limits, validation schedule, clipping, loggers, and clear errors."""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer import Callback, Module, Trainer
from qtrainer.callbacks import EarlyStopping, ModelCheckpoint
from qtrainer.checkpoint_io import CheckpointError
from qtrainer.loggers import CSVLogger

from helpers import TinyModule, make_loader, quiet_trainer_kwargs


def test_fit_learns_and_reports_validation_metrics(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=6, seed=0))
    trainer.fit(tiny_module, make_loader(), make_loader(shuffle=False))
    first, last = trainer.log_history[0], trainer.log_history[-1]
    assert last["val_loss"] < first["val_loss"]
    assert trainer.callback_metrics["val_acc"] >= 0.85
    assert trainer.global_step == 6 * 8 and trainer.current_epoch == 6


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


def test_callbacks_passed_to_fit_join_only_that_call(tmp_path, tiny_module):
    class Counter(Callback):
        calls = 0

        def on_train_start(self, trainer, module):
            Counter.calls += 1

    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(tiny_module, make_loader(), callbacks=[Counter()])
    trainer.fit(tiny_module, make_loader())
    assert Counter.calls == 1 and not any(isinstance(c, Counter) for c in trainer.callbacks)


def test_loaders_from_the_module_and_validate_test_predict(tmp_path):
    class WithLoaders(TinyModule):
        def train_dataloader(self):
            return make_loader()

        def val_dataloader(self):
            return make_loader(shuffle=False)

    paddle.seed(0)
    module = WithLoaders()
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(module)
    [val] = trainer.validate(module)
    assert set(val) == {"val_loss", "val_acc"}
    [test] = trainer.test(module, make_loader(shuffle=False))
    assert "test_loss" in test
    predictions = trainer.predict(module, make_loader(n=16, shuffle=False))
    assert len(predictions) == 2 and list(predictions[0].shape) == [8, 2]


def test_csv_logger_gets_step_and_epoch_metrics(tmp_path, tiny_module):
    logger = CSVLogger(str(tmp_path))
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=2, logger=logger, log_every_n_steps=4))
    trainer.fit(tiny_module, make_loader(), make_loader(shuffle=False))
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    assert [r["step"] for r in rows if r.get("val_loss")] == ["8", "16"]
    assert [r["step"] for r in rows if r.get("train_loss_step")] == ["4", "8", "12", "16"]
    assert len([r for r in rows if r.get("train_loss_epoch")]) == 2


def test_default_logger_writes_tensorboard_events(tmp_path, tiny_module):
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=1, enable_progress_bar=False, num_threads=1)
    trainer.fit(tiny_module, make_loader(), make_loader(shuffle=False))
    files = [f for _, _, fs in os.walk(trainer.log_dir) for f in fs]
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert any(f.endswith(".ckpt") for f in files)  # default ModelCheckpoint under log_dir


def test_early_stopping_stops_training(tmp_path, tiny_module):
    class Flat(TinyModule):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", paddle.to_tensor(1.0))

    paddle.seed(0)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=20, callbacks=[EarlyStopping("val_loss", patience=2)]))
    trainer.fit(Flat(), make_loader(), make_loader(shuffle=False))
    assert trainer.current_epoch == 3


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(max_epochs=0), "max_epochs=0"),
    (dict(max_steps=-1), "max_steps=-1"),
    (dict(accumulate_grad_batches=0), "accumulate_grad_batches=0"),
    (dict(precision="8-bit"), "precision='8-bit' is not supported; use one of"),
    (dict(device="tpu"), "device='tpu' is not supported; use one of: auto, cpu, gpu"),
    (dict(limit_train_batches=1.5), "limit_train_batches=1.5"),
    (dict(val_check_interval=0.0), "val_check_interval=0.0"),
])
def test_bad_trainer_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(**quiet_trainer_kwargs(tmp_path, **kwargs))


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="checks the message of a CPU-only build")
def test_gpu_on_a_cpu_build_lists_what_is_available(tmp_path):
    with pytest.raises(ValueError, match="sees no GPU.*available here: auto, cpu"):
        Trainer(**quiet_trainer_kwargs(tmp_path, device="gpu"))


def test_unwritable_root_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be created.*is not a directory"):
        Trainer(**quiet_trainer_kwargs(tmp_path, default_root_dir=str(blocker / "logs")))


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


def test_configure_optimizers_missing_or_wrong(tmp_path):
    class NoOptim(Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            return self.fc(batch[0]).mean()

    with pytest.raises(NotImplementedError, match="must implement configure_optimizers"):
        Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1)).fit(NoOptim(), make_loader())

    class WrongOptim(NoOptim):
        def configure_optimizers(self):
            return "adam"

    with pytest.raises(TypeError, match="configure_optimizers returned str"):
        Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1)).fit(WrongOptim(), make_loader())


def test_plain_layer_is_refused_with_a_hint(tmp_path):
    with pytest.raises(TypeError, match="ClassificationModule"):
        Trainer(**quiet_trainer_kwargs(tmp_path)).fit(nn.Linear(8, 2), make_loader())


def test_monitor_never_logged_lists_logged_metrics(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True,
                                             callbacks=[ModelCheckpoint(dirpath=str(tmp_path), monitor="val_los")]))
    with pytest.raises(Exception, match=r"val_los.*val_acc"):
        trainer.fit(tiny_module, make_loader(), make_loader(shuffle=False))


def test_bad_checkpoints_are_named_and_never_overwrite_the_last_good_one(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(CheckpointError, match="missing.ckpt.*does not exist"):
        trainer.fit(tiny_module, make_loader(), ckpt_path=str(tmp_path / "missing.ckpt"))
    good = tmp_path / "good.ckpt"
    trainer.fit(tiny_module, make_loader())
    trainer.save_checkpoint(str(good))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.ckpt.*truncated"):
        trainer.fit(tiny_module, make_loader(), ckpt_path=str(truncated))
    foreign = tmp_path / "foreign.ckpt"
    paddle.save(tiny_module.state_dict(), str(foreign))
    with pytest.raises(CheckpointError, match="not a qtrainer checkpoint"):
        trainer.fit(tiny_module, make_loader(), ckpt_path=str(foreign))


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


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(tiny_module, make_loader())
    tiny_module.net[0].weight.set_value(np.full(tiny_module.net[0].weight.shape, np.inf, dtype="float32"))
    with pytest.raises(FloatingPointError, match="non-finite values in .*net.0.weight"):
        trainer.save_checkpoint(str(tmp_path / "bad.ckpt"))
    assert not (tmp_path / "bad.ckpt").exists()


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


def test_stopping_a_partly_read_loader_is_quick_and_stops_its_thread():
    import time

    from qtrainer.trainer import _close_iterator

    iterator = iter(make_loader(n=160, batch_size=8))
    next(iterator), next(iterator)
    thread = iterator._thread
    start = time.perf_counter()
    _close_iterator(iterator)
    elapsed = time.perf_counter() - start
    assert not thread.is_alive()
    assert elapsed < 0.9, f"closing took {elapsed:.2f} s (Paddle's own shutdown sleeps 1 s)"


# -- a user's ModelCheckpoint / progress bar replaces the default -----------------------------


def ckpt_files(directory):
    return sorted(f for _, _, fs in os.walk(directory) for f in fs if f.endswith(".ckpt"))


def test_checkpoint_given_to_fit_replaces_the_default(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path / "root", max_epochs=1, enable_checkpointing=True))
    default = trainer.checkpoint_callback
    mine = ModelCheckpoint(dirpath=str(tmp_path / "mine"), save_last=True)  # same state key as the default
    trainer.fit(tiny_module, make_loader(), callbacks=[mine])
    assert ckpt_files(tmp_path / "mine") == ["epoch=0-step=8.ckpt", "last.ckpt"]
    assert ckpt_files(tmp_path / "root") == []  # the default did not write as well
    assert trainer.callbacks == [default]  # back for the next call


def test_monitored_checkpoint_given_to_fit_is_the_only_checkpointer(tmp_path, tiny_module):
    seen = []

    class Spy(Callback):
        def on_train_start(self, trainer, module):
            seen.extend(trainer.checkpoint_callbacks)

    trainer = Trainer(**quiet_trainer_kwargs(tmp_path / "root", max_epochs=1, enable_checkpointing=True))
    mine = ModelCheckpoint(dirpath=str(tmp_path / "mine"), monitor="val_loss")
    trainer.fit(tiny_module, make_loader(), make_loader(shuffle=False), callbacks=[mine, Spy()])
    assert seen == [mine]
    assert ckpt_files(tmp_path / "root") == [] and len(ckpt_files(tmp_path / "mine")) == 1


def test_progress_bar_given_to_fit_replaces_the_default(tmp_path, tiny_module):
    from qtrainer.callbacks import TQDMProgressBar

    seen = []

    class Spy(Callback):
        def on_train_start(self, trainer, module):
            seen.extend(c for c in trainer.callbacks if isinstance(c, TQDMProgressBar))

    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1, enable_progress_bar=True))
    mine = TQDMProgressBar(refresh_rate=5)
    trainer.fit(tiny_module, make_loader(), callbacks=[mine, Spy()])
    assert seen == [mine]


# -- training that trains nothing is an error, not a silent success --------------------------


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
    with caplog.at_level("WARNING", logger="qtrainer.trainer"):
        trainer.fit(tiny_module, (b for b in batches))
    assert trainer.global_step == len(batches) and epochs == [0, 1]
    assert "yielded no batches in epoch 1 (an iterator or generator is used up by its first pass" in caplog.text


# -- a batch that does not fit the model names the layer ----------------------------------------


class _Conv(Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2D(3, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean(axis=[2, 3]))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return paddle.optimizer.SGD(0.1, parameters=self.parameters())


def _images(channels):
    return [(paddle.rand([2, channels, 8, 8]), paddle.to_tensor([[0], [1]]))]


def test_a_batch_with_the_wrong_channel_count_names_the_layer_and_expected_shape(tmp_path):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"_Conv.training_step: layer 'features.0' \(Conv2D\) got an input of shape "
                                         r"\[2, 1, 8, 8\]; it expects \[N, 3, H, W\] \(in_channels=3"):
        trainer.fit(_Conv(), _images(1))


def test_a_validation_batch_with_the_wrong_channel_count_names_the_layer(tmp_path):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"_Conv.validation_step: layer 'features.0' \(Conv2D\) "
                                         r"got an input of shape \[2, 4, 8, 8\]"):
        trainer.fit(_Conv(), _images(3), _images(4))
