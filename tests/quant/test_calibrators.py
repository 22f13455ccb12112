"""Tests of qtrainer/quant/calibrators.py: histogram accumulation, thresholds, validation, registry."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from qtrainer.quant.calibrators import (
    ACTIVATION_CALIBRATORS,
    ZERO_THRESHOLD,
    AbsmaxCalibrator,
    HistCalibrator,
    KLCalibrator,
    MSECalibrator,
    kl_threshold,
    make_activation_calibrator,
    mse_threshold,
)


def _scale(obs) -> float:
    return float(obs.scale().numpy()[0])


def _batches(seed: int = 0, n: int = 6, kind: str = "gaussian") -> list[np.ndarray]:
    """Batches whose magnitude grows and shrinks, so the histogram range changes several times."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if kind == "gaussian":
            b = rng.standard_normal((8, 4, 16, 16))
        elif kind == "laplace":
            b = rng.laplace(size=(8, 4, 16, 16))
        else:  # relu of a gaussian: half exact zeros
            b = np.maximum(rng.standard_normal((8, 4, 16, 16)), 0.0)
        out.append((b * [0.3, 5.0, 1.0, 40.0, 0.01, 2.0][i % 6]).astype("float32"))
    return out


def _observe(obs, batches):
    for b in batches:
        obs(paddle.to_tensor(b))
    return obs


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
# thresholds against brute-force references
# ------------------------------------------------------------------------------------------
def _brute_kl(counts: np.ndarray, width: float, qmax: int) -> float:
    """Literal loop over candidates building P and Q as documented in kl_threshold."""
    counts = np.asarray(counts, dtype=np.float64)
    last = int(np.flatnonzero(counts)[-1]) + 1
    counts = counts[:last]
    best_kl, best_i = np.inf, None
    for i in range(max(qmax, (last - 1) // 2), last + 1):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()
        q = np.zeros(i)
        for g in range(qmax):
            a, b = g * i // qmax, (g + 1) * i // qmax
            nz = p[a:b] > 0
            if nz.any():
                q[a:b][nz] = counts[a:b].sum() / nz.sum()
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        if np.any(q[m] == 0):
            continue
        kl = float(np.sum(p[m] * np.log(p[m] / q[m])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * width


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "relu"])
def test_kl_threshold_matches_brute_force(kind):
    obs = _observe(KLCalibrator(bins=256, upsample_bins=4), _batches(seed=7, kind=kind))
    counts, width = obs.histogram(exclude_zeros=True)
    assert _scale(obs) == pytest.approx(_brute_kl(counts, width, 127), rel=1e-6)


def test_kl_threshold_with_4_bits_and_sparse_histogram_matches_brute_force():
    rng = np.random.default_rng(8)
    counts = rng.poisson(3.0, size=200).astype(np.float64) * (rng.random(200) < 0.6)
    counts[-1] = 5
    assert kl_threshold(counts, 0.1, quant_bits=4) == pytest.approx(_brute_kl(counts, 0.1, 7))


def test_kl_with_fewer_bins_than_levels_returns_the_top_edge():
    counts = np.array([5.0, 3, 0, 2, 1, 0, 0])
    assert kl_threshold(counts, 0.5, quant_bits=8) == pytest.approx(5 * 0.5)


def test_kl_clips_a_long_tail():
    rng = np.random.default_rng(9)
    x = rng.laplace(size=400_000).astype("float32")
    t = _scale(_observe(KLCalibrator(), [x]))
    assert 0.2 * np.abs(x).max() < t < 0.9 * np.abs(x).max()


@pytest.mark.parametrize("percent", [0.9, 0.999, 1.0])
def test_hist_threshold_is_the_quantile(percent):
    batches = _batches(seed=10, kind="laplace")
    obs = _observe(HistCalibrator(hist_percent=percent), batches)
    allx = np.abs(np.concatenate([b.ravel() for b in batches]))
    _, width = obs.histogram()
    assert abs(_scale(obs) - np.quantile(allx, percent)) <= width


def _qdq_mse(x: np.ndarray, t: float, qmax: int = 127) -> float:
    s = t / qmax
    return float(np.mean((x - np.clip(np.round(x / s), -qmax, qmax) * s) ** 2))


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "relu"])
def test_mse_threshold_is_near_the_brute_force_optimum(kind):
    rng = np.random.default_rng(11)
    x = {"gaussian": rng.standard_normal, "laplace": rng.laplace}.get(
        kind, lambda size: np.maximum(rng.standard_normal(size), 0))(size=300_000).astype("float32")
    t = _scale(_observe(MSECalibrator(), [x]))
    grid = np.linspace(0.05, 1.0, 400) * np.abs(x).max()
    best = min(_qdq_mse(x, g) for g in grid)
    assert _qdq_mse(x, t) <= 1.01 * best
    assert _qdq_mse(x, t) < 0.8 * _qdq_mse(x, float(np.abs(x).max()))  # clipping really helps


def test_mse_keeps_the_max_for_uniform_data():
    counts = np.full(500, 100.0)
    assert mse_threshold(counts, 0.01) >= 0.98 * 5.0


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


def test_absmax_calibrator_keeps_the_running_max():
    obs = _observe(AbsmaxCalibrator(), [np.array([1.0, -3.0], "float32"), np.array([2.0], "float32")])
    assert _scale(obs) == 3.0
    assert obs.sync_modes() == {"abs_max": "max", "seen": "max"}


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------
def test_registry_builds_each_seed_quantizer():
    assert set(ACTIVATION_CALIBRATORS) == {"KLQuantizer", "HistQuantizer", "AbsmaxQuantizer", "MSEQuantizer"}
    for name, cls in ACTIVATION_CALIBRATORS.items():
        assert type(make_activation_calibrator(name)) is cls
    h = make_activation_calibrator("HistQuantizer", upsample_bins=127, hist_percent=0.999)
    assert (h.bins, h.upsample_bins, h.hist_percent) == (1024, 127, 0.999)


def test_registry_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError, match="'KLQuantiser'.*AbsmaxQuantizer.*HistQuantizer.*KLQuantizer"):
        make_activation_calibrator("KLQuantiser")


@pytest.mark.parametrize("name, kwargs, bad", [
    ("KLQuantizer", {"hist_percent": 0.9}, "hist_percent"),
    ("AbsmaxQuantizer", {"bins": 512}, "bins"),
    ("MSEQuantizer", {"moving_rate": 0.9}, "moving_rate"),
])
def test_registry_rejects_kwargs_the_calibrator_does_not_take(name, kwargs, bad):
    with pytest.raises(TypeError, match=f"{name}.*'{bad}'.*accepts.*quant_bits"):
        make_activation_calibrator(name, **kwargs)


def test_registry_passes_bad_values_to_validation():
    with pytest.raises(ValueError, match="upsample_bins=-1"):
        make_activation_calibrator("KLQuantizer", upsample_bins=-1)
