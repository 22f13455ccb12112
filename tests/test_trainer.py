"""qtrainer/trainer.py: arguments, fit/validate/test/predict, callbacks and loggers, and clear errors.

The loops' behaviour is in tests/loops/, checkpoint files in test_checkpointing.py."""
from __future__ import annotations

import csv
import os

import paddle
import pytest
from paddle import nn

from qtrainer import Callback, Module, Trainer
from qtrainer.callbacks import EarlyStopping, ModelCheckpoint
from qtrainer.loggers import CSVLogger

from helpers import TinyModule, make_loader, quiet_trainer_kwargs


def test_fit_learns_and_reports_validation_metrics(tmp_path, tiny_module):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=6, seed=0))
    trainer.fit(tiny_module, make_loader(), make_loader(shuffle=False))
    first, last = trainer.log_history[0], trainer.log_history[-1]
    assert last["val_loss"] < first["val_loss"]
    assert trainer.callback_metrics["val_acc"] >= 0.85
    assert trainer.global_step == 6 * 8 and trainer.current_epoch == 6


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
