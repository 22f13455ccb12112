"""Observers: their statistics against NumPy, their buffers, their axes."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from qtrainer.quant.observers.absmax import (
    MIN_SCALE,
    AbsmaxCalibrator,
    AbsMaxObserver,
    MovingAverageAbsMaxObserver,
    PerChannelAbsMaxObserver,
)


def _batches(n, shape=(4, 3, 5, 5), seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(shape) * rng.uniform(0.5, 4.0)).astype("float32") for _ in range(n)]


def _scale(obs) -> np.ndarray:
    return obs.scale().numpy().reshape(-1)


def test_abs_max_keeps_the_last_batch():
    obs = AbsMaxObserver()
    batches = _batches(3)
    for b in batches:
        out = obs(paddle.to_tensor(b))
        np.testing.assert_array_equal(out.numpy(), b)  # observing passes the input through
    np.testing.assert_allclose(_scale(obs), [np.abs(batches[-1]).max()], rtol=0)


def test_abs_max_accumulate_keeps_the_running_max():
    obs = AbsMaxObserver(accumulate=True)
    batches = _batches(4, seed=1)
    for b in batches:
        obs(paddle.to_tensor(b))
    np.testing.assert_allclose(_scale(obs), [max(np.abs(b).max() for b in batches)], rtol=0)


def test_abs_max_of_a_negative_extreme():
    obs = AbsMaxObserver()
    obs(paddle.to_tensor([[0.5, -3.0, 2.0]]))
    assert _scale(obs)[0] == 3.0


def test_has_observed_and_the_scale_before_observing():
    for obs in (AbsMaxObserver(), MovingAverageAbsMaxObserver(), PerChannelAbsMaxObserver(8, 0, 3)):
        assert not obs.has_observed()
        assert np.all(_scale(obs) == np.float32(MIN_SCALE))
        obs(paddle.ones([3, 2]))
        assert obs.has_observed()


def test_all_zero_input_gives_a_positive_scale():
    for obs in (AbsMaxObserver(), MovingAverageAbsMaxObserver(), PerChannelAbsMaxObserver(8, 0, 2)):
        obs(paddle.zeros([2, 4]))
        assert np.all(_scale(obs) > 0)


@pytest.mark.parametrize("rate", [0.9, 0.5])
def test_moving_average_matches_paddles_formula(rate):
    obs = MovingAverageAbsMaxObserver(moving_rate=rate)
    state = accum = 0.0
    for b in _batches(5, seed=2):
        obs(paddle.to_tensor(b))
        state = rate * state + 1.0
        accum = rate * accum + float(np.abs(b).max())
        np.testing.assert_allclose(_scale(obs), [accum / state], rtol=1e-6)
    np.testing.assert_allclose(obs.state.numpy(), [state], rtol=1e-6)
    np.testing.assert_allclose(obs.accum.numpy(), [accum], rtol=1e-6)


def test_moving_average_first_observation_is_that_abs_max():
    obs = MovingAverageAbsMaxObserver()
    b = _batches(1, seed=3)[0]
    obs(paddle.to_tensor(b))
    np.testing.assert_allclose(_scale(obs), [np.abs(b).max()], rtol=1e-6)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.5, 2.0])
def test_moving_average_rejects_rates_outside_the_open_interval(rate):
    with pytest.raises(ValueError, match="moving_rate"):
        MovingAverageAbsMaxObserver(moving_rate=rate)


def test_per_channel_axis_0_of_a_conv_weight():
    w = _batches(1, shape=(6, 3, 3, 3), seed=4)[0]
    obs = PerChannelAbsMaxObserver(8, axis=0, channels=6)
    obs(paddle.to_tensor(w))
    np.testing.assert_allclose(_scale(obs), np.abs(w).max(axis=(1, 2, 3)), rtol=0)


def test_per_channel_axis_1_of_a_linear_weight():
    w = _batches(1, shape=(7, 5), seed=5)[0]  # Linear weight: [in, out]
    obs = PerChannelAbsMaxObserver(8, axis=1, channels=5)
    obs(paddle.to_tensor(w))
    np.testing.assert_allclose(_scale(obs), np.abs(w).max(axis=0), rtol=0)


def test_per_channel_negative_axis_and_accumulate():
    ws = _batches(3, shape=(4, 6), seed=6)
    obs = PerChannelAbsMaxObserver(8, axis=-1, channels=6, accumulate=True)
    for w in ws:
        obs(paddle.to_tensor(w))
    expected = np.max([np.abs(w).max(axis=0) for w in ws], axis=0)
    np.testing.assert_allclose(_scale(obs), expected, rtol=0)


def test_per_channel_allocates_lazily_and_checks_the_channel_count():
    obs = PerChannelAbsMaxObserver(8, axis=0)
    assert "absmax" not in obs.state_dict()
    obs(paddle.ones([3, 2]))
    assert list(obs.state_dict()["absmax"].shape) == [3]
    with pytest.raises(ValueError, match="expected 3 channels"):
        obs(paddle.ones([4, 2]))


def test_per_channel_axis_out_of_range():
    obs = PerChannelAbsMaxObserver(8, axis=2, channels=3)
    with pytest.raises(ValueError, match="out of range"):
        obs(paddle.ones([3, 2]))


def test_state_is_in_persistable_buffers_and_sync_modes_name_them():
    for obs in (AbsMaxObserver(), MovingAverageAbsMaxObserver(), PerChannelAbsMaxObserver(8, 0, 2)):
        obs(paddle.ones([2, 2]))
        keys = set(obs.state_dict())
        assert set(obs.sync_modes()) == keys
        assert set(obs.sync_modes().values()) <= {"max", "mean"}


def test_state_dict_round_trip_restores_the_scale():
    a = MovingAverageAbsMaxObserver()
    for b in _batches(3, seed=7):
        a(paddle.to_tensor(b))
    b = MovingAverageAbsMaxObserver()
    b.set_state_dict(a.state_dict())
    np.testing.assert_array_equal(_scale(a), _scale(b))
    assert b.has_observed()


def test_observing_does_not_touch_the_gradient():
    x = paddle.to_tensor(_batches(1, seed=8)[0], stop_gradient=False)
    obs = MovingAverageAbsMaxObserver()
    (obs(x) * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full(x.shape, 2.0, dtype="float32"))


def test_absmax_calibrator_keeps_the_running_max_in_the_observers_buffer():
    obs = AbsmaxCalibrator()
    for b in [np.array([1.0, -3.0], "float32"), np.array([2.0], "float32")]:
        obs(paddle.to_tensor(b))
    assert float(obs.scale().numpy()[0]) == 3.0
    assert obs.sync_modes() == {"absmax": "max"}  # one running abs max: AbsMaxObserver(accumulate=True)'s
    assert isinstance(obs, AbsMaxObserver) and obs.accumulate
    assert set(obs.state_dict()) == {"absmax"}
