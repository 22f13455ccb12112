import json
import logging
import math
import os

import pytest

from qtrainer.callbacks import ModelCheckpoint

BATCHES = 4  # optimizer steps per epoch in these tests


def run_epoch(trainer, callbacks, epoch, metrics, validate=True):
    """Simulate the Trainer's end of ``epoch``: metrics logged, validation ended, checkpoint saved."""
    trainer.current_epoch = epoch
    trainer.global_step = (epoch + 1) * BATCHES
    trainer.callback_metrics = dict(metrics)
    for cb in callbacks:
        if validate:
            cb.on_validation_end(trainer, None)
    for cb in callbacks:
        cb.on_epoch_checkpoint(trainer, None)


def fit_setup(make_trainer, *callbacks, **kwargs):
    trainer = make_trainer(callbacks=callbacks, **kwargs)
    for cb in callbacks:
        cb.setup(trainer, None, "fit")
    return trainer


def ckpt_names(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".ckpt")) if os.path.isdir(directory) else []


@pytest.mark.parametrize("mode", ["min", "max"])
def test_top_k_keeps_the_k_best_files_and_removes_the_rest(make_trainer, tmp_path, mode):
    values = [0.5, 0.3, 0.4, 0.1, 0.6, 0.35]
    cb = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{epoch}", monitor="val_loss", mode=mode, save_top_k=2)
    trainer = fit_setup(make_trainer, cb)
    for epoch, v in enumerate(values):
        run_epoch(trainer, [cb], epoch, {"val_loss": v})

    order = sorted(range(len(values)), key=lambda i: values[i], reverse=(mode == "max"))
    best_two = order[:2]
    assert ckpt_names(tmp_path / "ck") == sorted(f"epoch={i}.ckpt" for i in best_two)
    assert cb.best_model_path == str(tmp_path / "ck" / f"epoch={order[0]}.ckpt")
    assert cb.best_model_score == values[order[0]]
    assert cb.kth_value == values[order[1]]
    assert cb.kth_best_model_path == str(tmp_path / "ck" / f"epoch={order[1]}.ckpt")
    assert {os.path.basename(p): s for p, s in cb.best_k_models.items()} == {
        f"epoch={i}.ckpt": values[i] for i in best_two
    }
    # each saved file is a real checkpoint of the epoch in its name
    for i in best_two:
        with open(tmp_path / "ck" / f"epoch={i}.ckpt") as f:
            assert json.load(f)["epoch"] == i


def test_save_top_k_minus_one_keeps_all_and_zero_keeps_none(make_trainer, tmp_path):
    keep_all = ModelCheckpoint(dirpath=tmp_path / "all", filename="{epoch}", monitor="val_loss", save_top_k=-1)
    keep_none = ModelCheckpoint(dirpath=tmp_path / "none", filename="{epoch}", monitor="val_loss", save_top_k=0)
    trainer = fit_setup(make_trainer, keep_all, keep_none)
    for epoch, v in enumerate([0.3, 0.2, 0.9]):
        run_epoch(trainer, [keep_all, keep_none], epoch, {"val_loss": v})
    assert ckpt_names(tmp_path / "all") == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]
    assert keep_all.best_model_path.endswith("epoch=1.ckpt")
    assert ckpt_names(tmp_path / "none") == []


def test_without_monitor_top_1_keeps_only_the_newest(make_trainer, tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path)
    trainer = fit_setup(make_trainer, cb)
    for epoch in range(3):
        run_epoch(trainer, [cb], epoch, {"loss": 1.0, "epoch": float(epoch)})  # a logged "epoch" metric
    assert ckpt_names(tmp_path) == ["epoch=2-step=12.ckpt"]
    assert cb.best_model_path == str(tmp_path / "epoch=2-step=12.ckpt")
    with open(cb.best_model_path) as f:  # the state inside the file already names the file
        assert json.load(f)["callbacks"][cb.state_key]["best_model_path"] == cb.best_model_path


def test_save_last_writes_last_ckpt_every_epoch(make_trainer, tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=0, save_last=True)
    trainer = fit_setup(make_trainer, cb)
    for epoch in range(3):
        run_epoch(trainer, [cb], epoch, {"val_loss": 1.0})
        with open(tmp_path / "last.ckpt") as f:
            assert json.load(f)["epoch"] == epoch
    assert ckpt_names(tmp_path) == ["last.ckpt"]
    assert cb.last_model_path == str(tmp_path / "last.ckpt")


def test_default_dirpath_is_under_the_trainer_log_dir(make_trainer, tmp_path):
    cb = ModelCheckpoint()
    trainer = fit_setup(make_trainer, cb)
    run_epoch(trainer, [cb], 0, {})
    assert ckpt_names(tmp_path / "checkpoints") == ["epoch=0-step=4.ckpt"]


@pytest.mark.parametrize(
    "filename, auto_insert, expected",
    [
        (None, True, "epoch=3-step=16.ckpt"),
        (None, False, "epoch=3-step=16.ckpt"),
        ("{epoch}-{val_loss:.2f}", True, "epoch=3-val_loss=0.12.ckpt"),
        ("{epoch}-{val_loss:.2f}", False, "3-0.12.ckpt"),
        ("net-{epoch:02d}-{val/acc:.3f}", True, "net-epoch=03-val_acc=0.877.ckpt"),
    ],
)
def test_filename_template(make_trainer, tmp_path, filename, auto_insert, expected):
    cb = ModelCheckpoint(dirpath=tmp_path, filename=filename, auto_insert_metric_name=auto_insert)
    trainer = fit_setup(make_trainer, cb)
    run_epoch(trainer, [cb], 3, {"val_loss": 0.1234, "val/acc": 0.87654})
    assert ckpt_names(tmp_path) == [expected]


def test_every_n_train_steps_saves_from_step_checkpoints_only(make_trainer, tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer = fit_setup(make_trainer, cb)
    for step in range(1, 2 * BATCHES + 1):
        trainer.global_step = step
        trainer.current_epoch = (step - 1) // BATCHES
        cb.on_step_checkpoint(trainer, None)
        cb.on_step_checkpoint(trainer, None)  # called again at the same step: no second save
        if step % BATCHES == 0:
            cb.on_epoch_checkpoint(trainer, None)
    assert ckpt_names(tmp_path) == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt"]
    assert len(trainer.saved) == 2


def test_every_n_epochs(make_trainer, tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=2, save_top_k=-1)
    trainer = fit_setup(make_trainer, cb)
    for epoch in range(5):
        run_epoch(trainer, [cb], epoch, {})
        cb.on_step_checkpoint(trainer, None)  # step checkpoints are off for an epoch-based instance
    assert ckpt_names(tmp_path) == ["epoch=1.ckpt", "epoch=3.ckpt"]


def test_step_and_epoch_instances_with_the_same_name_do_not_clobber(make_trainer, tmp_path):
    per_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=BATCHES)
    per_epoch = ModelCheckpoint(dirpath=tmp_path)
    trainer = fit_setup(make_trainer, per_epoch, per_step)
    for epoch in range(2):
        trainer.current_epoch, trainer.global_step = epoch, (epoch + 1) * BATCHES
        per_step.on_step_checkpoint(trainer, None)  # the Trainer: step checkpoints, later epoch ones
        per_epoch.on_step_checkpoint(trainer, None)
        per_step.on_epoch_checkpoint(trainer, None)
        per_epoch.on_epoch_checkpoint(trainer, None)
    assert ckpt_names(tmp_path) == ["epoch=1-step=8-v1.ckpt", "epoch=1-step=8.ckpt"]
    assert per_step.best_model_path == str(tmp_path / "epoch=1-step=8.ckpt")
    assert per_epoch.best_model_path == str(tmp_path / "epoch=1-step=8-v1.ckpt")
    assert per_step.state_key != per_epoch.state_key


def test_files_it_did_not_write_are_neither_overwritten_nor_removed(make_trainer, tmp_path):
    foreign = tmp_path / "epoch=0-step=4.ckpt"
    foreign.write_text("from an earlier run")
    cb = ModelCheckpoint(dirpath=tmp_path)
    trainer = fit_setup(make_trainer, cb)
    run_epoch(trainer, [cb], 0, {})
    run_epoch(trainer, [cb], 1, {})
    assert foreign.read_text() == "from an earlier run"
    assert ckpt_names(tmp_path) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt"]
    assert trainer.saved == [str(tmp_path / "epoch=0-step=4-v1.ckpt"), str(tmp_path / "epoch=1-step=8.ckpt")]


def test_non_finite_values_never_become_best(make_trainer, tmp_path, caplog):
    cb = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", monitor="val_loss", save_top_k=2)
    trainer = fit_setup(make_trainer, cb)
    with caplog.at_level(logging.WARNING):
        run_epoch(trainer, [cb], 0, {"val_loss": math.nan})
    assert cb.best_model_path == "" and cb.best_model_score is None
    assert "not finite" in caplog.text
    run_epoch(trainer, [cb], 1, {"val_loss": 0.7})
    run_epoch(trainer, [cb], 2, {"val_loss": math.inf})
    run_epoch(trainer, [cb], 3, {"val_loss": -math.inf})
    assert cb.best_model_score == 0.7
    assert ckpt_names(tmp_path) == ["epoch=1.ckpt"]


def test_missing_monitor_without_validation_lists_the_logged_metrics(make_trainer, tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="max")
    trainer = fit_setup(make_trainer, cb, val=False)
    with pytest.raises(ValueError) as info:
        run_epoch(trainer, [cb], 0, {"train_loss": 0.3, "acc": 0.5}, validate=False)
    message = str(info.value)
    assert "'val_acc'" in message and "'train_loss'" in message and "'acc'" in message
    assert ckpt_names(tmp_path) == []


def test_missing_monitor_waits_for_the_first_validation_then_errors(make_trainer, tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, monitor="val_acc", mode="max")
    trainer = fit_setup(make_trainer, cb)
    trainer.sanity_checking = True
    cb.on_validation_end(trainer, None)  # sanity checks do not count as validation
    cb.on_epoch_checkpoint(trainer, None)
    trainer.sanity_checking = False
    run_epoch(trainer, [cb], 0, {"loss": 0.3}, validate=False)  # validation not run yet: skip
    assert trainer.saved == []
    with pytest.raises(ValueError, match="'val_accuracy'"):
        run_epoch(trainer, [cb], 1, {"loss": 0.3, "val_accuracy": 0.9}, validate=True)


def test_missing_filename_field_is_an_error(make_trainer, tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}-{val_acc:.2f}")
    trainer = fit_setup(make_trainer, cb, val=False)
    with pytest.raises(ValueError, match="'val_acc'.*'loss'"):
        run_epoch(trainer, [cb], 0, {"loss": 0.3}, validate=False)


def test_state_round_trip_continues_the_top_k(make_trainer, tmp_path):
    def make():
        return ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", monitor="val_loss", save_top_k=2, save_last=True)

    first = make()
    trainer = fit_setup(make_trainer, first)
    for epoch, v in enumerate([0.5, 0.2, 0.4]):
        run_epoch(trainer, [first], epoch, {"val_loss": v})
    with open(tmp_path / "last.ckpt") as f:
        saved_state = json.load(f)["callbacks"][first.state_key]

    resumed = make()
    trainer2 = fit_setup(make_trainer, resumed)
    resumed.load_state_dict(saved_state)
    for attr in ("best_model_path", "best_model_score", "best_k_models", "kth_best_model_path", "kth_value",
                 "last_model_path"):
        assert getattr(resumed, attr) == getattr(first, attr), attr
    run_epoch(trainer2, [resumed], 3, {"val_loss": 0.3})  # evicts epoch 2 (0.4) written before the resume
    assert ckpt_names(tmp_path) == ["epoch=1.ckpt", "epoch=3.ckpt", "last.ckpt"]


def test_state_from_another_directory_restores_only_the_best_path(make_trainer, tmp_path):
    first = ModelCheckpoint(dirpath=tmp_path / "a", monitor="val_loss")
    trainer = fit_setup(make_trainer, first)
    run_epoch(trainer, [first], 0, {"val_loss": 0.5})
    moved = ModelCheckpoint(dirpath=tmp_path / "b", monitor="val_loss")
    fit_setup(make_trainer, moved)
    moved.load_state_dict(first.state_dict())
    assert moved.best_model_path == first.best_model_path
    assert moved.best_k_models == {}


def test_two_instances_keep_separate_state_in_a_checkpoint(make_trainer, tmp_path):
    by_loss = ModelCheckpoint(dirpath=tmp_path / "l", monitor="val_loss")
    by_acc = ModelCheckpoint(dirpath=tmp_path / "a", monitor="val_acc", mode="max")
    assert by_loss.state_key != by_acc.state_key
    trainer = fit_setup(make_trainer, by_loss, by_acc)
    run_epoch(trainer, [by_loss, by_acc], 0, {"val_loss": 0.5, "val_acc": 0.6})
    with open(by_acc.best_model_path) as f:
        states = json.load(f)["callbacks"]
    assert states[by_loss.state_key]["best_model_score"] == 0.5
    assert states[by_acc.state_key]["best_model_score"] == 0.6


def test_no_save_during_sanity_check(make_trainer, tmp_path):
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = fit_setup(make_trainer, cb)
    trainer.sanity_checking = True
    trainer.global_step = 1
    cb.on_step_checkpoint(trainer, None)
    cb.on_epoch_checkpoint(trainer, None)
    assert trainer.saved == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mode": "avg"}, ValueError, r"mode='avg'.*\['min', 'max'\]"),
        ({"save_top_k": -2}, ValueError, "save_top_k=-2"),
        ({"save_top_k": 1.5}, TypeError, "save_top_k=1.5"),
        ({"save_top_k": 3}, ValueError, "save_top_k=3, monitor=None"),
        ({"every_n_epochs": 1, "every_n_train_steps": 5}, ValueError, "only one"),
        ({"every_n_epochs": -1}, ValueError, "every_n_epochs=-1"),
        ({"monitor": 3}, TypeError, "monitor=3"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelCheckpoint(**kwargs)
