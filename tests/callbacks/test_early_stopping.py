import logging
import math

import pytest

from qtrainer.callbacks import EarlyStopping


def run(trainer, cb, values, name="val_loss", validate=True):
    """Feed one value per epoch; return the epoch after which the trainer was asked to stop (or None)."""
    for epoch, v in enumerate(values):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {name: v}
        if validate:
            cb.on_validation_end(trainer, None)
        cb.on_train_epoch_end(trainer, None)
        if trainer.should_stop:
            return epoch
    return None


@pytest.mark.parametrize(
    "values, patience, mode, min_delta, stop_epoch",
    [
        ([1.0, 0.9, 0.8, 0.85, 0.86, 0.87], 3, "min", 0.0, 5),
        ([1.0, 0.9, 0.8, 0.85, 0.79, 0.87, 0.9, 0.9], 3, "min", 0.0, 7),
        ([1.0, 0.9, 0.8, 0.7], 1, "min", 0.0, None),
        ([1.0, 0.995, 0.99, 0.985], 2, "min", 0.01, 2),  # improvements below min_delta do not count
        ([0.5, 0.6, 0.6, 0.55], 2, "max", 0.0, 3),
        ([0.5, 0.4], 0, "max", 0.0, 1),
    ],
)
def test_patience_min_delta_and_mode(make_trainer, values, patience, mode, min_delta, stop_epoch):
    cb = EarlyStopping("val_loss", patience=patience, mode=mode, min_delta=min_delta)
    trainer = make_trainer()
    assert run(trainer, cb, values) == stop_epoch
    if stop_epoch is not None:
        assert cb.stopped_epoch == stop_epoch
        assert "did not improve" in cb.stop_reason


def test_best_score_follows_improvements(make_trainer):
    cb = EarlyStopping("val_loss", patience=5, min_delta=0.05)
    trainer = make_trainer()
    run(trainer, cb, [1.0, 0.97, 0.9, 0.88])
    assert cb.best_score == 0.9
    assert cb.wait_count == 1


def test_checks_after_validation_only_when_there_is_validation(make_trainer):
    cb = EarlyStopping("val_loss", patience=0)
    trainer = make_trainer(val=True)
    trainer.callback_metrics = {"val_loss": 1.0}
    cb.on_train_epoch_end(trainer, None)
    cb.on_train_epoch_end(trainer, None)
    assert cb.best_score is None and not trainer.should_stop  # epoch ends are ignored
    trainer.sanity_checking = True
    cb.on_validation_end(trainer, None)
    assert cb.best_score is None  # the sanity check is ignored
    trainer.sanity_checking = False
    trainer.state_stage = "validate"
    cb.on_validation_end(trainer, None)
    assert cb.best_score is None  # trainer.validate() is not training
    trainer.state_stage = "fit"
    cb.on_validation_end(trainer, None)
    assert cb.best_score == 1.0


def test_without_validation_checks_at_epoch_end(make_trainer):
    cb = EarlyStopping("train_loss", patience=1)
    trainer = make_trainer(val=False)
    assert run(trainer, cb, [1.0, 1.0], name="train_loss", validate=False) == 1


def test_a_validation_loader_without_batches_counts_as_no_validation(make_trainer):
    cb = EarlyStopping("train_loss", patience=1)
    trainer = make_trainer(val=True)
    trainer.num_val_batches = 0  # e.g. limit_val_batches=0: on_validation_end never fires
    assert run(trainer, cb, [1.0, 1.0], name="train_loss", validate=False) == 1


def test_non_finite_stops_at_once(make_trainer, caplog):
    cb = EarlyStopping("val_loss", patience=10)
    trainer = make_trainer()
    with caplog.at_level(logging.INFO, logger="qtrainer.callbacks.early_stopping"):
        assert run(trainer, cb, [1.0, 0.5, math.nan]) == 2
    assert "not finite" in cb.stop_reason and "0.5" in cb.stop_reason
    assert cb.stop_reason in caplog.text
    assert cb.best_score == 0.5


def test_non_finite_counts_as_no_improvement_without_check_finite(make_trainer):
    cb = EarlyStopping("val_loss", patience=2, check_finite=False)
    trainer = make_trainer()
    assert run(trainer, cb, [1.0, math.nan, math.inf, 0.5]) == 2
    assert cb.best_score == 1.0


@pytest.mark.parametrize(
    "mode, kwargs, values, stop_epoch, reason",
    [
        ("min", {"stopping_threshold": 0.2}, [1.0, 0.5, 0.2, 0.1], 2, "stopping threshold"),
        ("max", {"stopping_threshold": 0.9}, [0.5, 0.95], 1, "stopping threshold"),
        ("min", {"divergence_threshold": 5.0}, [1.0, 4.0, 5.0, 6.0], 3, "divergence threshold"),
        ("max", {"divergence_threshold": 0.1}, [0.5, 0.05], 1, "divergence threshold"),
    ],
)
def test_thresholds(make_trainer, mode, kwargs, values, stop_epoch, reason):
    cb = EarlyStopping("val_loss", mode=mode, patience=100, **kwargs)
    trainer = make_trainer()
    assert run(trainer, cb, values) == stop_epoch
    assert reason in cb.stop_reason


def test_state_round_trip_continues_the_count(make_trainer):
    first = EarlyStopping("val_loss", patience=3)
    trainer = make_trainer()
    run(trainer, first, [1.0, 0.8, 0.9, 0.95])
    state = first.state_dict()
    resumed = EarlyStopping("val_loss", patience=3)
    resumed.load_state_dict(state)
    assert (resumed.wait_count, resumed.best_score, resumed.stopped_epoch) == (2, 0.8, 0)
    trainer2 = make_trainer()
    trainer2.callback_metrics = {"val_loss": 0.85}
    resumed.on_validation_end(trainer2, None)
    assert trainer2.should_stop  # third check without improvement, counted across the resume


def test_state_keys_differ_by_monitor_and_mode():
    keys = {EarlyStopping("a").state_key, EarlyStopping("b").state_key, EarlyStopping("a", mode="max").state_key}
    assert len(keys) == 3


def test_missing_metric_lists_the_logged_ones(make_trainer):
    cb = EarlyStopping("val_los")
    trainer = make_trainer()
    trainer.callback_metrics = {"val_loss": 1.0, "loss": 2.0}
    with pytest.raises(ValueError) as info:
        cb.on_validation_end(trainer, None)
    assert "'val_los'" in str(info.value) and "'val_loss'" in str(info.value) and "'loss'" in str(info.value)


def test_missing_metric_is_skipped_when_not_strict(make_trainer, caplog):
    cb = EarlyStopping("val_los", strict=False)
    trainer = make_trainer()
    trainer.callback_metrics = {"val_loss": 1.0}
    with caplog.at_level(logging.WARNING):
        cb.on_validation_end(trainer, None)
    assert not trainer.should_stop and "val_los" in caplog.text


def test_does_not_undo_a_stop_requested_elsewhere(make_trainer):
    cb = EarlyStopping("val_loss")
    trainer = make_trainer()
    trainer.should_stop = True
    trainer.callback_metrics = {"val_loss": 1.0}
    cb.on_validation_end(trainer, None)
    assert trainer.should_stop


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mode": "maximum"}, ValueError, r"mode='maximum'.*\['min', 'max'\]"),
        ({"patience": -1}, ValueError, "patience=-1"),
        ({"min_delta": -0.1}, ValueError, "min_delta=-0.1"),
        ({"stopping_threshold": "low"}, TypeError, "stopping_threshold='low'"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        EarlyStopping("val_loss", **kwargs)


def test_monitor_is_required():
    with pytest.raises(TypeError, match="monitor=None"):
        EarlyStopping(None)
