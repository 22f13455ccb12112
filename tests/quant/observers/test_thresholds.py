"""Tests of qtrainer/quant/observers/thresholds.py: each threshold search against a brute-force reference."""
from __future__ import annotations

import numpy as np
import pytest

from qtrainer.quant.observers.histogram import HistCalibrator, KLCalibrator, MSECalibrator
from qtrainer.quant.observers.thresholds import kl_threshold, mse_threshold

from quant.observers.histogram_data import batches as _batches, observe as _observe, scale as _scale


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
