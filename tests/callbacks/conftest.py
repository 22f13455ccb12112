"""A small stand-in for the Trainer: the attributes and methods the standard callbacks rely on."""
from __future__ import annotations

import json
import os

import pytest


class StubTrainer:
    """Just enough Trainer for callback unit tests; ``save_checkpoint`` really writes a file."""

    def __init__(self, root: str, callbacks=(), loggers=(), val: bool = True) -> None:
        self.current_epoch = 0
        self.global_step = 0
        self.max_epochs = 10
        self.max_steps = None
        self.num_training_batches = 4
        self.num_val_batches = 2
        self.num_test_batches = 3
        self.num_predict_batches = 3
        self.num_sanity_val_steps = 2
        self.log_every_n_steps = 1
        self.sanity_checking = False
        self.state_stage = "fit"
        self.callback_metrics: dict[str, float] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.should_stop = False
        self.is_global_zero = True
        self.global_rank = 0
        self.world_size = 1
        self.default_root_dir = root
        self.loggers = list(loggers)
        self.callbacks = list(callbacks)
        self.optimizers: list = []
        self.lr_schedulers: list[dict] = []
        self.val_dataloaders = [object()] if val else None
        self.saved: list[str] = []
        self.logged: list[tuple[dict, int | None]] = []

    @property
    def logger(self):
        return self.loggers[0] if self.loggers else None

    @property
    def log_dir(self):
        return self.logger.log_dir if self.logger is not None else self.default_root_dir

    @property
    def checkpoint_callbacks(self):
        from qtrainer.callbacks import ModelCheckpoint

        return [c for c in self.callbacks if isinstance(c, ModelCheckpoint)]

    def save_checkpoint(self, filepath: str) -> None:
        state = {
            "epoch": self.current_epoch,
            "global_step": self.global_step,
            "callbacks": {c.state_key: c.state_dict() for c in self.callbacks},
        }
        with open(filepath, "w") as f:
            json.dump(state, f)
        self.saved.append(filepath)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.logged.append((dict(metrics), step))

    def files(self, directory: str) -> list[str]:
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


@pytest.fixture
def make_trainer(tmp_path):
    def make(**kwargs) -> StubTrainer:
        return StubTrainer(str(tmp_path), **kwargs)

    return make
