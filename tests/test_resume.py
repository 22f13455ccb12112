"""Exact resume: a run stopped (at an epoch end or mid-epoch) and resumed ends where the full run ends."""
from __future__ import annotations

import os

import numpy as np
import paddle
import pytest

from qtrainer import Callback, Trainer
from qtrainer.callbacks import ModelCheckpoint

from helpers import TinyModule, make_loader, quiet_trainer_kwargs


class KillAtStep(Callback):
    """Simulates a crash right before the optimizer step number ``step`` + 1."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def fit(tmp_path, epochs, *, ckpt_path=None, every_n_train_steps=None, kill_at=None, max_steps=None):
    paddle.seed(0)
    module = TinyModule()
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, save_last=True,
                                 every_n_train_steps=every_n_train_steps,
                                 filename="{epoch}-{step}")
    callbacks = [checkpoint] + ([KillAtStep(kill_at)] if kill_at is not None else [])
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=epochs, max_steps=max_steps, seed=7,
                                             enable_checkpointing=True, num_sanity_val_steps=1,
                                             callbacks=callbacks))
    trainer.fit(module, make_loader(), make_loader(shuffle=False), ckpt_path=ckpt_path)
    return module, trainer


def weights(module):
    return {k: v.numpy().copy() for k, v in module.state_dict().items()}


def max_abs_diff(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def val_history(trainer):
    return [(r["epoch"], r["step"], r.get("val_loss"), r.get("val_acc")) for r in trainer.log_history]


def test_resume_after_an_epoch_matches_the_full_run(tmp_path):
    full_module, full = fit(tmp_path / "full", 3)
    fit(tmp_path / "part", 1)
    resumed_module, resumed = fit(tmp_path / "part", 3, ckpt_path="last")
    assert max_abs_diff(weights(full_module), weights(resumed_module)) <= 1e-6
    assert val_history(full) == val_history(resumed)
    assert resumed.global_step == full.global_step == 24


def test_resume_mid_epoch_after_a_crash_matches_the_full_run(tmp_path):
    full_module, full = fit(tmp_path / "full", 3, every_n_train_steps=3)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "part", 3, every_n_train_steps=3, kill_at=10)
    mid_epoch = os.path.join(tmp_path / "part" / "ckpt", "epoch=1-step=9.ckpt")
    assert os.path.exists(mid_epoch), os.listdir(tmp_path / "part" / "ckpt")
    resumed_module, resumed = fit(tmp_path / "part", 3, every_n_train_steps=3, ckpt_path=mid_epoch)
    assert max_abs_diff(weights(full_module), weights(resumed_module)) <= 1e-6
    assert val_history(full) == val_history(resumed)


def test_resume_after_max_steps_continues_the_unfinished_epoch(tmp_path):
    full_module, _ = fit(tmp_path / "full", 2)
    fit(tmp_path / "part", 2, max_steps=5)
    resumed_module, resumed = fit(tmp_path / "part", 2, ckpt_path="last")
    assert resumed.global_step == 16
    assert max_abs_diff(weights(full_module), weights(resumed_module)) <= 1e-6


def test_ckpt_path_last_from_a_new_trainer_finds_the_earlier_versions_checkpoint(tmp_path):
    from qtrainer.loggers import CSVLogger

    def trainer(**kwargs):
        return Trainer(**quiet_trainer_kwargs(tmp_path, logger=CSVLogger(str(tmp_path)), enable_checkpointing=True,
                                              **kwargs))

    first = trainer(max_epochs=1)
    first.fit(TinyModule(), make_loader())
    assert first.log_dir.endswith("version_0") and os.listdir(os.path.join(first.log_dir, "checkpoints"))
    second = trainer(max_epochs=2)  # logs to version_1, whose checkpoints/ is empty
    second.fit(TinyModule(), make_loader(), ckpt_path="last")
    assert second.log_dir.endswith("version_1")
    assert second.global_step == 16  # resumed after epoch 0's 8 steps, trained epoch 1 only


def test_ckpt_path_last_without_a_checkpoint_says_where_it_looked(tmp_path):
    from qtrainer.checkpoint_io import CheckpointError

    directory = tmp_path / "ckpt"
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, enable_checkpointing=True,
                                             callbacks=[ModelCheckpoint(dirpath=str(directory))]))
    with pytest.raises(CheckpointError, match=rf"ckpt_path='last' but no checkpoint \(\*.ckpt\) was found: looked in "
                                              rf"\['{directory}'\]; pass ckpt_path=<path of a .ckpt file>"):
        trainer.fit(TinyModule(), make_loader(), ckpt_path="last")
    nowhere = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(CheckpointError, match=r"this Trainer has no ModelCheckpoint"):
        nowhere.fit(TinyModule(), make_loader(), ckpt_path="last")
