"""qtrainer/state.py: TrainerState is plain data that round-trips, and the Trainer's attributes read it."""
from __future__ import annotations

import pickle

import pytest

from qtrainer import Trainer
from qtrainer.state import RUNNING_LOSS_WINDOW, TrainerState

from helpers import TinyModule, make_loader, quiet_trainer_kwargs


def test_state_dict_round_trips_as_plain_data():
    state = TrainerState(epoch=2, global_step=17, batches_done=3, data_seed=5, should_stop=True)
    state.log_history.append({"epoch": 1, "step": 16, "val_loss": 0.5})
    state.callback_metrics["val_loss"] = 0.5
    state.running_loss.extend([1.0, 2.0])
    saved = state.state_dict()
    assert saved["running_loss"] == [1.0, 2.0] and isinstance(saved["running_loss"], list)
    assert pickle.loads(pickle.dumps(saved)) == saved  # plain data
    assert not {"stage", "sanity_checking", "failed"} & set(saved)  # flags of the call in progress
    copy = TrainerState()
    copy.load_state_dict(saved)
    assert copy.state_dict() == saved and copy.running_loss.maxlen == RUNNING_LOSS_WINDOW
    saved["log_history"][0]["val_loss"] = 9.0
    assert copy.log_history[0]["val_loss"] == 0.5  # loading copies


def test_a_checkpoint_carries_progress_not_the_stop_decision():
    state = TrainerState(epoch=1, global_step=8, should_stop=True)
    state.progress_bar_metrics["loss"] = 0.3
    saved = state.checkpoint_dict()
    assert saved["epoch"] == 1 and saved["global_step"] == 8
    assert "should_stop" not in saved and "progress_bar_metrics" not in saved


def test_unknown_fields_are_refused_by_name():
    with pytest.raises(KeyError, match=r"unknown fields \['epochs'\]"):
        TrainerState().load_state_dict({"epochs": 3})


def test_record_merges_rows_of_the_same_epoch_and_step():
    state = TrainerState(epoch=0, global_step=4)
    state.record({"val_loss": 0.5})
    state.record({"train_loss_epoch": 0.7})
    state.global_step = 8
    state.record({"val_loss": 0.4})
    assert state.log_history == [{"epoch": 0, "step": 4, "val_loss": 0.5, "train_loss_epoch": 0.7},
                                 {"epoch": 0, "step": 8, "val_loss": 0.4}]


def test_trainer_attributes_are_views_of_the_state(tmp_path):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(TinyModule(), make_loader())
    state = trainer.state
    assert (trainer.current_epoch, trainer.global_step) == (state.epoch, state.global_step) == (2, 16)
    assert trainer.log_history is state.log_history and trainer.callback_metrics is state.callback_metrics
    trainer.should_stop = True  # what EarlyStopping does
    assert state.should_stop is True
    assert trainer.state_stage == state.stage == "fit"
