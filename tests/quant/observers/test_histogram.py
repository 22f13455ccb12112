"""Tests of qtrainer/quant/observers/histogram.py: histogram accumulation, ranges, validation."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from qtrainer.quant.observers.absmax import AbsmaxCalibrator
from qtrainer.quant.observers.histogram import ZERO_THRESHOLD, HistCalibrator, KLCalibrator, MSECalibrator

from quant.observers.histogram_data import batches as _batches, observe as _observe, scale as _scale


def _direct_histogram(values: np.ndarray, fine_bins: int, range_exp: int) -> np.ndarray:
    """Histogram of all values at once, at the final range, with the documented binning rule."""
    coef = np.float32(fine_bins * 2.0**-range_exp)
    idx = (np.abs(values).astype(np.float32) * coef).astype(np.int64).ravel()
    return np.bincount(idx, minlength=fine_bins)


def _exp(obs) -> int:
    return int(obs.range_exp.numpy()[0])


# ------------------------------------------------------------------------------------------
# accumulation
# ------------------------------------------------------------------------------------------
def test_histogram_equals_histogram_of_all_data_at_final_range():
    batches = _batches()
    obs = _observe(KLCalibrator(bins=64, upsample_bins=8), batches)
    allx = np.concatenate([b.ravel() for b in batches])
    assert 2.0 ** (_exp(obs) - 1) <= np.abs(allx).max() < 2.0 ** _exp(obs)
    np.testing.assert_array_equal(obs.hist.numpy(), _direct_histogram(allx, 64 * 8, _exp(obs)))


def test_histogram_and_thresholds_do_not_depend_on_batch_order():
    batches = _batches(seed=1)
    for cls in (KLCalibrator, HistCalibrator, MSECalibrator):
        a = _observe(cls(bins=128, upsample_bins=4), batches)
        b = _observe(cls(bins=128, upsample_bins=4), batches[::-1])
        np.testing.assert_array_equal(a.hist.numpy(), b.hist.numpy())
        assert _exp(a) == _exp(b)
        assert _scale(a) == _scale(b)


def test_two_ranks_merged_equal_one_rank_over_all_data():
    batches = _batches(seed=2)
    full = _observe(KLCalibrator(), batches)
    rank0 = _observe(KLCalibrator(), batches[0::2])
    rank1 = _observe(KLCalibrator(), batches[1::2])
    assert _exp(rank0) != _exp(rank1)  # the ranks really have to be aligned
    # what a reducer does: max of range_exp, expand_range, sum of hist and zeros, max of seen
    common = max(_exp(rank0), _exp(rank1))
    rank0.expand_range(common)
    rank1.expand_range(common)
    merged = KLCalibrator()
    merged.set_state_dict({
        "hist": paddle.to_tensor(rank0.hist.numpy() + rank1.hist.numpy()),
        "zeros": paddle.to_tensor(rank0.zeros.numpy() + rank1.zeros.numpy()),
        "range_exp": paddle.to_tensor(np.array([common], dtype=np.int64)),
        "seen": paddle.to_tensor(np.maximum(rank0.seen.numpy(), rank1.seen.numpy())),
    })
    np.testing.assert_array_equal(merged.hist.numpy(), full.hist.numpy())
    assert _exp(merged) == _exp(full)
    assert _scale(merged) == _scale(full)
    assert set(full.sync_modes()) == {"range_exp", "hist", "zeros", "seen"}


def test_expand_range_equals_histogramming_at_the_larger_range():
    batches = _batches(seed=3, n=3)
    obs = _observe(HistCalibrator(bins=32, upsample_bins=4), batches)
    allx = np.concatenate([b.ravel() for b in batches])
    target = _exp(obs) + 3
    obs.expand_range(target)
    np.testing.assert_array_equal(obs.hist.numpy(), _direct_histogram(allx, 128, target))
    with pytest.raises(ValueError, match="can only grow"):
        obs.expand_range(target - 1)


def test_state_round_trips_through_state_dict():
    obs = _observe(MSECalibrator(bins=64, upsample_bins=4), _batches(seed=4, n=3))
    state = obs.state_dict()
    assert {"hist", "zeros", "range_exp", "seen"} <= set(state)
    fresh = MSECalibrator(bins=64, upsample_bins=4)
    fresh.set_state_dict(state)
    assert fresh.has_observed()
    assert _scale(fresh) == _scale(obs)


def test_search_histogram_has_about_bins_bins_spanning_the_max():
    bins, up = 100, 4
    rng = np.random.default_rng(5)
    for top in (1.01, 1.5, 1.99, 3.0, 0.26):  # maxima at different places inside [2**(e-1), 2**e)
        x = rng.uniform(0, top, size=5000).astype("float32")
        x[0] = top
        obs = _observe(KLCalibrator(bins=bins, upsample_bins=up), [x])
        counts, width = obs.histogram()
        assert bins * up / (up + 2) <= counts.size <= bins
        assert counts.sum() == x.size
        assert (counts.size - 1) * width <= top < counts.size * width  # bins are [lo, hi)


def test_exact_zeros_are_left_out_of_kl_and_mse_but_not_of_the_percentile():
    rng = np.random.default_rng(6)
    x = rng.standard_normal(20000).astype("float32")
    with_zeros = np.concatenate([x, np.zeros(20000, dtype="float32")])
    for cls in (KLCalibrator, MSECalibrator):
        assert _scale(_observe(cls(), [x])) == _scale(_observe(cls(), [with_zeros]))
    assert _scale(_observe(HistCalibrator(hist_percent=0.9), [with_zeros])) < _scale(
        _observe(HistCalibrator(hist_percent=0.9), [x])
    )


def test_all_zero_input_then_real_data():
    obs = KLCalibrator(bins=64, upsample_bins=2)
    obs(paddle.zeros([4, 8]))
    assert obs.has_observed() and obs.all_zero()
    assert _scale(obs) == pytest.approx(ZERO_THRESHOLD)
    obs(paddle.to_tensor(np.linspace(-3, 3, 101, dtype="float32")))
    assert not obs.all_zero()
    assert obs.zeros.numpy()[0] == 32 + 1  # 32 zeros, plus 0.0 in the linspace
    assert obs.hist.numpy().sum() == 32 + 101


def test_float16_input_is_accepted():
    x = paddle.to_tensor(np.linspace(-2, 2, 1001, dtype="float32")).astype("float16")
    obs = HistCalibrator(hist_percent=1.0)
    obs(x)
    assert _scale(obs) == pytest.approx(2.0, rel=1e-2)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KLCalibrator, HistCalibrator, MSECalibrator, AbsmaxCalibrator])
def test_scale_before_any_observation_is_a_clear_error(cls):
    with pytest.raises(RuntimeError, match="before any tensor was observed"):
        cls().scale()


@pytest.mark.parametrize("kwargs, word", [
    ({"bins": 0}, "bins=0"), ({"bins": -3}, "bins=-3"), ({"bins": 2.5}, "bins=2.5"),
    ({"bins": True}, "bins=True"), ({"upsample_bins": 0}, "upsample_bins=0"),
    ({"upsample_bins": "64"}, "upsample_bins='64'"), ({"quant_bits": 1}, "quant_bits=1"),
    ({"quant_bits": 17}, "quant_bits=17"), ({"bins": 2**20, "upsample_bins": 2**10}, "too large"),
])
def test_bad_histogram_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word.replace("*", r"\*")):
        KLCalibrator(**kwargs)


@pytest.mark.parametrize("percent", [0, 0.0, -0.1, 1.0001, 2, float("nan"), "0.9", True])
def test_bad_hist_percent(percent):
    with pytest.raises(ValueError, match="hist_percent"):
        HistCalibrator(hist_percent=percent)


def test_hist_percent_of_one_is_accepted():
    assert HistCalibrator(hist_percent=1).hist_percent == 1.0


@pytest.mark.parametrize("cls", [KLCalibrator, AbsmaxCalibrator])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activation_is_rejected(cls, bad):
    obs = cls()
    x = np.ones(10, dtype="float32")
    x[3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        obs(paddle.to_tensor(x))
    assert not obs.has_observed()
