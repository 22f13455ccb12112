"""Activation thresholds from a histogram of ``|x|``: percentile, KL (entropy) and MSE.

Pure NumPy, vectorised over every candidate threshold. The histogram calibrators
(``qtrainer.quant.observers.histogram``) call them; they are public so that a report can compare
every method on the same histogram (``qtrainer.quant.diagnostics.ptq_report``).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from qtrainer.quant.base import qmax_for_bits

__all__ = ["percentile_threshold", "kl_threshold", "mse_threshold", "clipped_fraction", "check_percent"]


def check_percent(value: object) -> float:
    """``value`` as a float when it is a fraction in (0, 1]; ``ValueError`` naming it otherwise."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or not 0.0 < float(value) <= 1.0
    ):
        raise ValueError(
            f"hist_percent={value!r} is invalid: use a number in (0, 1], the fraction of |x| "
            f"kept below the threshold (e.g. 0.99999)"
        )
    return float(value)


def _as_counts(hist: np.ndarray) -> np.ndarray:
    counts = np.asarray(hist, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"hist must be a non-empty 1-D array of counts, got shape {counts.shape}")
    if counts.sum() <= 0:
        raise ValueError("hist has no counts: observe at least one non-empty tensor first")
    return counts


def percentile_threshold(hist: np.ndarray, bin_width: float, percent: float) -> float:
    """The ``percent`` quantile of ``|x|`` read from a histogram of ``|x|`` over ``[0, len*width)``.

    The quantile is located in its bin and interpolated linearly inside it (counts are taken as
    uniform within a bin); ``percent=1`` gives the top edge of the last non-empty bin.
    """
    counts = _as_counts(hist)
    percent = check_percent(percent)
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    target = percent * cum[-1]
    j = int(np.searchsorted(cum[1:], target, side="left"))
    j = min(j, counts.size - 1)  # first bin whose cumulative count reaches the target (non-empty)
    inside = (target - cum[j]) / counts[j]
    return float((j + min(max(inside, 0.0), 1.0)) * bin_width)


def kl_threshold(hist: np.ndarray, bin_width: float, quant_bits: int = 8) -> float:
    """Entropy calibration: the threshold whose quantized distribution is closest to the data.

    ``hist`` counts ``|x|`` in equal bins of ``bin_width``. A candidate keeps the first ``i``
    bins (threshold ``T = i * bin_width``), for every ``i`` from half the histogram (the number of
    bins up to the last non-empty one, halved, as Paddle's ``cal_kl_threshold`` does; at least
    ``qmax``) to the last non-empty bin: lower candidates let a dense spike (e.g. a normalised
    image's background) become the threshold and clip most of the range. The reference distribution ``P`` is the first ``i`` bins with the counts beyond ``T``
    added to bin ``i - 1`` (clipping). The quantized distribution ``Q`` merges the same ``i``
    bins (without the outliers) into ``qmax`` groups of (almost) equal width, one per positive
    integer level, and spreads each group's count evenly over the group's bins that are non-empty
    in ``P``. The chosen threshold minimises ``KL(P || Q)`` (both normalised). When the histogram
    has no more bins than ``qmax`` levels there is nothing to merge and the top edge is returned.
    (:class:`KLCalibrator` passes a histogram without the exact zeros, which quantize exactly: a
    spike of zeros in bin 0 would otherwise pull the threshold down.)
    """
    counts = _as_counts(hist)
    levels = qmax_for_bits(quant_bits)
    last = int(np.flatnonzero(counts)[-1]) + 1  # number of bins up to the last non-empty one
    counts = counts[:last]
    if last <= levels:
        return float(last * bin_width)
    total = counts.sum()
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    nonzero = np.concatenate([[0], np.cumsum(counts > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(counts > 0, counts * np.log(counts), 0.0)
    cum_hlogh = np.concatenate([[0.0], np.cumsum(hlogh)])

    cand = np.arange(max(levels, (last - 1) // 2), last + 1)  # bins kept
    edges = (np.arange(levels + 1)[None, :] * cand[:, None]) // levels  # [K, levels + 1]
    group_sum = cum[edges[:, 1:]] - cum[edges[:, :-1]]  # counts of Q per group (no outliers)
    group_nz = (nonzero[edges[:, 1:]] - nonzero[edges[:, :-1]]).astype(np.float64)
    outliers = total - cum[cand]
    # P's last bin holds the outliers too, so it is non-empty when they are.
    last_empty = counts[cand - 1] == 0
    group_nz[:, -1] += (last_empty & (outliers > 0)).astype(np.float64)
    p_group = group_sum.copy()
    p_group[:, -1] += outliers
    p_last = counts[cand - 1] + outliers
    with np.errstate(divide="ignore", invalid="ignore"):
        p_logp = cum_hlogh[cand - 1] + np.where(p_last > 0, p_last * np.log(p_last), 0.0)
        q_level = np.log(group_sum / group_nz)
        p_logq = np.where(p_group > 0, p_group * q_level, 0.0).sum(axis=1)
        kl = (p_logp - p_logq) / total - np.log(total) + np.log(cum[cand])
    kl = np.where(np.isfinite(kl), kl, np.inf)
    best = int(np.argmin(kl))
    return float(cand[best] * bin_width)


def _sawtooth_sq_integral(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """An antiderivative of ``(x - step * round(x / step)) ** 2`` (the squared rounding error)."""
    u = x / step + 0.5
    k = np.floor(u)
    f = u - k - 0.5
    return step**3 * (k / 12.0 + (f**3 + 0.125) / 3.0)


def mse_threshold(
    hist: np.ndarray, bin_width: float, quant_bits: int = 8, chunk: int = 128
) -> float:
    """The threshold minimising the expected squared quantization error over the histogram.

    Candidates are the bin edges ``T = i * bin_width`` for every ``i`` up to the last non-empty
    bin. Counts are taken as uniform inside their bin. For values below ``T`` the error is the
    rounding error to the grid ``T / qmax`` (integrated exactly over each bin); for values above
    ``T`` it is the clipping error ``(x - T) ** 2``.
    """
    counts = _as_counts(hist)
    qmax = qmax_for_bits(quant_bits)
    last = int(np.flatnonzero(counts)[-1]) + 1
    counts = counts[:last]
    lo = np.arange(last, dtype=np.float64) * bin_width
    hi = lo + bin_width
    # clipping error of bins >= i for T = i * w, from suffix sums of the first two moments
    m1 = (lo + hi) / 2.0
    m2 = (lo * lo + lo * hi + hi * hi) / 3.0
    suffix = lambda v: np.concatenate([np.cumsum(v[::-1])[::-1], [0.0]])  # noqa: E731
    s0, s1, s2 = suffix(counts), suffix(counts * m1), suffix(counts * m2)
    cand = np.arange(1, last + 1)
    t = cand * bin_width
    clip_err = np.maximum(s2[cand] - 2.0 * t * s1[cand] + t * t * s0[cand], 0.0)
    round_err = np.empty(cand.size)
    for start in range(0, cand.size, chunk):  # [chunk, last] blocks bound the memory
        c = cand[start:start + chunk]
        step = (c * bin_width / qmax)[:, None]
        per_bin = (_sawtooth_sq_integral(hi[None, :], step)
                   - _sawtooth_sq_integral(lo[None, :], step)) / bin_width
        kept = np.arange(last)[None, :] < c[:, None]
        round_err[start:start + chunk] = np.where(kept, per_bin * counts[None, :], 0.0).sum(axis=1)
    best = int(np.argmin(clip_err + round_err))
    return float(t[best])


def clipped_fraction(hist: np.ndarray, bin_width: float, threshold: float) -> float:
    """Fraction of the counts above ``threshold`` (counts uniform inside a bin)."""
    counts = _as_counts(hist)
    edges = np.arange(counts.size + 1) * bin_width
    above = np.clip((edges[1:] - threshold) / bin_width, 0.0, 1.0)
    return float((counts * above).sum() / counts.sum())
