"""Activation calibrators for post-training quantization (PTQ): abs-max, percentile, KL, MSE.

Every calibrator is an :class:`~qtrainer.quant.base.Observer`: ``forward`` watches an activation
and ``scale()`` returns the clipping threshold ``T`` (see ``base.py`` for the convention).

The three histogram calibrators share :class:`HistogramCalibrator`, which accumulates a histogram
of ``|x|`` on the fly, without storing activations. Its range is a power of two, ``[0, 2**e)``,
where ``e`` is the smallest exponent whose range holds every value seen so far. When a batch needs
a larger range, the counts merge in groups of ``2**k`` bins: the bin edges are nested, so the
histogram is exactly the one that histogramming every value at the final range would give, whatever
the order of the batches. Two ranks that calibrate halves of a data set therefore get, after
:meth:`HistogramCalibrator.expand_range` to the larger exponent and summing the counts, exactly the
histogram (and the thresholds) of one rank that saw everything.

The thresholds are computed from that histogram, vectorised over all candidate thresholds, by
:func:`percentile_threshold`, :func:`kl_threshold` and :func:`mse_threshold`; the functions are
public so a report can compare every method on the same histogram.
"""
from __future__ import annotations

import inspect
import logging
import math
import numbers
import zlib

import numpy as np
import paddle

from .base import Observer, qmax_for_bits

__all__ = [
    "AbsmaxCalibrator",
    "HistogramCalibrator",
    "HistCalibrator",
    "KLCalibrator",
    "MSECalibrator",
    "ACTIVATION_CALIBRATORS",
    "make_activation_calibrator",
    "calibrator_kwargs",
    "percentile_threshold",
    "kl_threshold",
    "mse_threshold",
    "clipped_fraction",
]

logger = logging.getLogger(__name__)

#: The histogram range is ``[0, 2**range_exp)``; exponents are clamped to this interval.
MIN_RANGE_EXP, MAX_RANGE_EXP = -100, 100
#: ``range_exp`` of a histogram that has only seen zeros (or nothing): below every real range.
EMPTY_RANGE_EXP = MIN_RANGE_EXP - 1
#: Largest number of accumulated bins (``bins * upsample_bins``); keeps bin indices exact in float32.
MAX_FINE_BINS = 2**24
#: Threshold returned when every observed value was zero (any positive threshold is exact then).
ZERO_THRESHOLD = 1e-8


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: use a positive integer")
    return int(value)


def _check_percent(value: object) -> float:
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


# --------------------------------------------------------------------------------------------
# thresholds from a histogram (pure numpy, vectorised over candidates)
# --------------------------------------------------------------------------------------------
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
    percent = _check_percent(percent)
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


# --------------------------------------------------------------------------------------------
# observers
# --------------------------------------------------------------------------------------------
class AbsmaxCalibrator(Observer):
    """Threshold = the largest ``|x|`` seen during calibration (per tensor).

    State: ``abs_max`` and ``seen`` persistable buffers; ranks combine them with a max.
    """

    def __init__(self, quant_bits: int = 8) -> None:
        super().__init__(quant_bits=quant_bits)
        self.register_buffer("abs_max", paddle.zeros([1], dtype="float32"), persistable=True)
        self.register_buffer("seen", paddle.zeros([1], dtype="int64"), persistable=True)

    def observe(self, x: paddle.Tensor) -> None:
        if x.size == 0:
            return
        m = paddle.max(paddle.abs(x.astype("float32"))).reshape([1])
        if not math.isfinite(float(m.numpy()[0])):
            raise ValueError(
                f"{type(self).__name__} observed a non-finite activation (max |x| = {float(m.numpy()[0])})"
            )
        self.abs_max.set_value(paddle.maximum(self.abs_max, m))
        self.seen.set_value(paddle.ones([1], dtype="int64"))

    def has_observed(self) -> bool:
        return bool(_item(self.seen) > 0)

    def sync_modes(self) -> dict[str, str]:
        """How each buffer is combined across ranks."""
        return {"abs_max": "max", "seen": "max"}

    def scale(self) -> paddle.Tensor:
        _require_observed(self)
        t = float(self.abs_max.numpy()[0])
        return paddle.to_tensor([t if t > 0 else ZERO_THRESHOLD], dtype="float32")


def _item(t: paddle.Tensor) -> int:
    """The single integer of a shape-[1] buffer."""
    return int(t.numpy().reshape(-1)[0])


def _require_observed(observer: Observer) -> None:
    if not observer.has_observed():
        raise RuntimeError(
            f"{type(observer).__name__}.scale() was called before any tensor was observed: "
            f"run at least one calibration batch through the model first"
        )


def _host_view(x: paddle.Tensor) -> np.ndarray:
    """The values of ``x`` as a numpy array: a zero-copy view on the CPU, a copy otherwise."""
    if x.place.is_cpu_place():
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError, ValueError):
            pass
    return x.numpy()


def _regroup(hist: np.ndarray, shift: int) -> np.ndarray:
    """Counts of ``hist`` at a range ``2**shift`` times larger: bins merge in groups of 2**shift."""
    if shift <= 0:
        return hist.copy()
    n = hist.size
    out = np.zeros_like(hist)
    if shift >= 63 or (1 << shift) >= n:
        out[0] = hist.sum()
        return out
    group = 1 << shift
    groups = -(-n // group)
    padded = np.zeros(groups * group, dtype=hist.dtype)
    padded[:n] = hist
    out[:groups] = padded.reshape(groups, group).sum(axis=1)
    return out


class HistogramCalibrator(Observer):
    """Base of the histogram calibrators: a histogram of ``|x|`` accumulated on the fly.

    Args:
        quant_bits: bits of the quantized activation (2..16).
        bins: the thresholds are searched on a histogram of about ``bins`` equal bins spanning
            ``[0, max|x|]`` -- the meaning ``bins`` has in Paddle's KL/hist quantizers.
        upsample_bins: number of sub-bins each of those bins is made of in the accumulated
            histogram. The accumulated histogram has ``bins * upsample_bins`` equal bins over
            ``[0, 2**e)`` (``2**e`` the smallest power of two above every ``|x|`` seen, or twice
            that when float32 rounding would put the max on the top edge); before the
            search, consecutive sub-bins are summed in groups of ``k = ceil(n / bins)``, ``n``
            being the number of sub-bins up to the last non-empty one, which gives
            ``ceil(n / k)`` search bins of width ``k * 2**e / (bins * upsample_bins)`` -- at most
            ``bins`` and at least ``bins * upsample_bins / (upsample_bins + 2)``. So the search
            grid ends within one sub-bin of ``max|x|`` whatever power of two the range is. In
            Paddle ``upsample_bins`` is likewise the sub-bin resolution used to re-bin the
            histogram when the range grows (Paddle spreads counts over the sub-bins; here the
            power-of-two range makes that re-binning exact).

    Exact zeros (e.g. after a ReLU) are counted in sub-bin 0 and also on their own: they quantize
    without error, so the KL and MSE searches leave them out (:meth:`histogram` with
    ``exclude_zeros=True``), while the percentile keeps them (it is a quantile of all values).

    State (persistable buffers, in ``state_dict``): ``hist`` (int64 counts of the
    ``bins * upsample_bins`` sub-bins), ``zeros`` (int64 count of exact zeros), ``range_exp``
    (``e``; ``EMPTY_RANGE_EXP`` while only zeros were seen) and ``seen``. To combine ranks:
    max-reduce ``range_exp``, call :meth:`expand_range` with it on every rank, then sum-reduce
    ``hist`` and ``zeros`` and max-reduce ``seen``.

    Values are binned as float32: sub-bin ``floor(float32(|x| * bins * upsample_bins / 2**e))``.
    Activations must be finite with ``max|x| < 2**100``.
    """

    #: whether the threshold search leaves the exact zeros out
    _exclude_zeros = True

    def __init__(self, quant_bits: int = 8, bins: int = 1024, upsample_bins: int = 64) -> None:
        super().__init__(quant_bits=quant_bits)
        self.bins = _check_positive_int(bins, "bins")
        self.upsample_bins = _check_positive_int(upsample_bins, "upsample_bins")
        fine = self.bins * self.upsample_bins
        if fine > MAX_FINE_BINS:
            raise ValueError(
                f"bins * upsample_bins = {bins} * {upsample_bins} = {fine} is too large: "
                f"keep it at most {MAX_FINE_BINS}"
            )
        self.fine_bins = fine
        self.register_buffer("hist", paddle.zeros([fine], dtype="int64"), persistable=True)
        self.register_buffer(
            "range_exp", paddle.full([1], EMPTY_RANGE_EXP, dtype="int64"), persistable=True
        )
        self.register_buffer("zeros", paddle.zeros([1], dtype="int64"), persistable=True)
        self.register_buffer("seen", paddle.zeros([1], dtype="int64"), persistable=True)
        self._cache: tuple[tuple, float] | None = None

    # -- accumulation ------------------------------------------------------------------------
    def _range_exp_for(self, m: np.float32) -> int:
        """Smallest exponent whose range puts ``m`` (hence every smaller value) below the top bin edge."""
        e = max(math.frexp(float(m))[1], MIN_RANGE_EXP)  # m < 2**e
        if e <= MAX_RANGE_EXP and int(m * np.float32(self.fine_bins * 2.0**-e)) >= self.fine_bins:
            e += 1  # float32 rounding put m on the top edge
        if e > MAX_RANGE_EXP:
            raise ValueError(
                f"{type(self).__name__} observed max |x| = {float(m):.4g}, beyond the supported "
                f"2**{MAX_RANGE_EXP}: the model's activations have probably diverged"
            )
        return e

    def observe(self, x: paddle.Tensor) -> None:
        if x.size == 0:
            return
        if x.dtype != paddle.float32:
            x = x.astype("float32")
        a = np.abs(_host_view(x))
        m = a.max()
        if not np.isfinite(m):
            raise ValueError(f"{type(self).__name__} observed a non-finite activation (max |x| = {m})")
        zeros = a.size - np.count_nonzero(a)
        hist = self.hist.numpy()
        exp = _item(self.range_exp)
        if m > 0:
            needed = self._range_exp_for(m)
            if needed > exp:
                hist = _regroup(hist, needed - exp)
                exp = needed
            np.multiply(a, np.float32(self.fine_bins * 2.0**-exp), out=a)  # sub-bin coordinates
            hist += np.bincount(a.astype(np.int64).ravel(), minlength=self.fine_bins)
        else:
            hist[0] += a.size
        self.hist.set_value(hist)
        self.zeros.set_value(self.zeros.numpy() + zeros)
        self.range_exp.set_value(np.array([exp], dtype=np.int64))
        self.seen.set_value(np.ones([1], dtype=np.int64))

    def expand_range(self, range_exp: int) -> None:
        """Bring the histogram to the range ``[0, 2**range_exp)`` (not smaller than the current one).

        The counts become exactly those of histogramming the same values at the larger range.
        """
        current = _item(self.range_exp)
        if isinstance(range_exp, bool) or not isinstance(range_exp, numbers.Integral):
            raise TypeError(f"range_exp must be an integer, got {range_exp!r}")
        if not current <= range_exp <= MAX_RANGE_EXP:
            raise ValueError(
                f"range_exp={range_exp} is invalid: use an integer from the current {current} "
                f"to {MAX_RANGE_EXP} (a histogram's range can only grow)"
            )
        if range_exp == current:
            return
        self.hist.set_value(_regroup(self.hist.numpy(), int(range_exp) - current))
        self.range_exp.set_value(np.array([range_exp], dtype=np.int64))

    def has_observed(self) -> bool:
        return bool(_item(self.seen) > 0)

    def sync_modes(self) -> dict[str, str]:
        """How each buffer is combined across ranks. ``range_exp`` first: every rank must then call
        :meth:`expand_range` with the reduced value before ``hist`` is summed."""
        return {"range_exp": "max", "hist": "sum", "zeros": "sum", "seen": "max"}

    # -- reading -----------------------------------------------------------------------------
    def fine_histogram(self) -> tuple[np.ndarray, float]:
        """The accumulated counts (``bins * upsample_bins`` sub-bins) and the sub-bin width."""
        _require_observed(self)
        exp = max(_item(self.range_exp), MIN_RANGE_EXP)
        return self.hist.numpy().copy(), 2.0**exp / self.fine_bins

    def histogram(self, exclude_zeros: bool = False) -> tuple[np.ndarray, float]:
        """The search histogram: about ``bins`` bins (float64 counts) spanning the observed range,
        and their width. ``exclude_zeros`` removes the exact zeros from bin 0."""
        fine, width = self.fine_histogram()
        if exclude_zeros:
            fine[0] -= _item(self.zeros)
        nonzero = np.flatnonzero(fine)
        n = int(nonzero[-1]) + 1 if nonzero.size else 1
        k = -(-n // self.bins)
        groups = -(-n // k)
        padded = np.zeros(groups * k, dtype=np.float64)
        padded[:n] = fine[:n]
        return padded.reshape(groups, k).sum(axis=1), width * k

    def all_zero(self) -> bool:
        """True when every observed value was zero."""
        return _item(self.range_exp) == EMPTY_RANGE_EXP

    def scale(self) -> paddle.Tensor:
        """The threshold of this calibrator (see the subclass), as a float32 tensor of shape [1]."""
        _require_observed(self)
        hist = self.hist.numpy()
        key = (_item(self.range_exp), _item(self.zeros), zlib.crc32(hist.tobytes()), int(hist.sum()))
        if self._cache is None or self._cache[0] != key:
            if self.all_zero():
                threshold = ZERO_THRESHOLD
            else:
                counts, width = self.histogram(exclude_zeros=self._exclude_zeros)
                threshold = self._threshold(counts, width)
            self._cache = (key, threshold)
            logger.debug("%s threshold %.6g", type(self).__name__, threshold)
        return paddle.to_tensor([self._cache[1]], dtype="float32")

    def _threshold(self, counts: np.ndarray, width: float) -> float:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, upsample_bins={self.upsample_bins}"


class HistCalibrator(HistogramCalibrator):
    """Percentile calibration: threshold = the ``hist_percent`` quantile of ``|x|``.

    ``hist_percent`` in (0, 1]; the quantile is read from the search histogram and interpolated
    inside its bin (:func:`percentile_threshold`). See :class:`HistogramCalibrator` for
    ``bins`` and ``upsample_bins``.
    """

    _exclude_zeros = False  # a quantile of all values, zeros included

    def __init__(
        self,
        quant_bits: int = 8,
        bins: int = 1024,
        upsample_bins: int = 64,
        hist_percent: float = 0.99999,
    ) -> None:
        super().__init__(quant_bits=quant_bits, bins=bins, upsample_bins=upsample_bins)
        self.hist_percent = _check_percent(hist_percent)

    def _threshold(self, counts: np.ndarray, width: float) -> float:
        return percentile_threshold(counts, width, self.hist_percent)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hist_percent={self.hist_percent}"


class KLCalibrator(HistogramCalibrator):
    """Entropy (KL-divergence) calibration over the search histogram (:func:`kl_threshold`).

    See :class:`HistogramCalibrator` for ``bins`` and ``upsample_bins``.
    """

    def _threshold(self, counts: np.ndarray, width: float) -> float:
        return kl_threshold(counts, width, self.quant_bits)


class MSECalibrator(HistogramCalibrator):
    """Threshold minimising the expected squared quantization error, clipping included
    (:func:`mse_threshold`). See :class:`HistogramCalibrator` for ``bins`` and ``upsample_bins``.
    """

    def _threshold(self, counts: np.ndarray, width: float) -> float:
        return mse_threshold(counts, width, self.quant_bits)


#: Seed (PaddleSlim) activation quantizer names -> calibrator classes.
ACTIVATION_CALIBRATORS: dict[str, type[Observer]] = {
    "KLQuantizer": KLCalibrator,
    "HistQuantizer": HistCalibrator,
    "AbsmaxQuantizer": AbsmaxCalibrator,
    "MSEQuantizer": MSECalibrator,
}


def calibrator_kwargs(cls: type[Observer]) -> list[str]:
    """Names of the keyword arguments a calibrator class accepts."""
    params = inspect.signature(cls.__init__).parameters
    return [name for name in params if name != "self"]


def make_activation_calibrator(name: str, **kwargs: object) -> Observer:
    """A new calibrator for the seed quantizer ``name`` (a key of ``ACTIVATION_CALIBRATORS``).

    Raises ``ValueError`` for an unknown name and ``TypeError`` for a keyword argument the chosen
    calibrator does not take; bad values raise ``ValueError`` from the calibrator.
    """
    if name not in ACTIVATION_CALIBRATORS:
        raise ValueError(
            f"unknown activation quantizer {name!r}: use one of {sorted(ACTIVATION_CALIBRATORS)}"
        )
    cls = ACTIVATION_CALIBRATORS[name]
    accepted = calibrator_kwargs(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"activation quantizer {name!r} does not take {', '.join(map(repr, unknown))}: "
            f"it accepts {accepted}"
        )
    return cls(**kwargs)
