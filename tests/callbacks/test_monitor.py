import math

import pytest

from qtrainer.callbacks import MonitorCallback


@pytest.mark.parametrize(
    "mode, min_delta, current, best, expected",
    [
        ("min", 0.0, 0.9, 1.0, True),
        ("min", 0.0, 1.0, 1.0, False),
        ("min", 0.1, 0.95, 1.0, False),
        ("min", 0.1, 0.85, 1.0, True),
        ("max", 0.0, 1.1, 1.0, True),
        ("max", 0.0, 0.9, 1.0, False),
        ("max", 0.1, 1.05, 1.0, False),
        ("max", 0.1, 1.2, 1.0, True),
        ("min", 0.0, 5.0, None, True),
        ("max", 0.0, math.nan, None, False),
        ("min", 0.0, -math.inf, 1.0, False),
        ("max", 0.0, math.inf, 1.0, False),
    ],
)
def test_is_improvement(mode, min_delta, current, best, expected):
    assert MonitorCallback("m", mode=mode, min_delta=min_delta)._is_improvement(current, best) is expected


def test_missing_metric_error_lists_what_is_logged(make_trainer):
    trainer = make_trainer()
    trainer.callback_metrics = {"val_loss": 1.0, "train_loss_epoch": 2.0}
    error = MonitorCallback("val_acc")._missing_metric_error(trainer)
    assert isinstance(error, ValueError)
    assert "'val_acc'" in str(error) and "'train_loss_epoch', 'val_loss'" in str(error)
    trainer.callback_metrics = {}
    assert "nothing has been logged" in str(MonitorCallback("val_acc")._missing_metric_error(trainer))


def test_reads_the_monitored_value_as_float(make_trainer):
    trainer = make_trainer()
    trainer.callback_metrics = {"m": 3}
    cb = MonitorCallback("m")
    assert cb._get_monitor_value(trainer) == 3.0 and isinstance(cb._get_monitor_value(trainer), float)
    assert MonitorCallback("other")._get_monitor_value(trainer) is None


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"mode": "best"}, ValueError, r"MonitorCallback\(mode='best'\).*\['min', 'max'\]"),
        ({"min_delta": -1}, ValueError, "min_delta=-1"),
        ({"min_delta": math.nan}, ValueError, "min_delta=nan"),
        ({"min_delta": "0.1"}, TypeError, "min_delta='0.1'"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        MonitorCallback("m", **kwargs)
