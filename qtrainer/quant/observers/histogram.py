"""Histogram calibrators (PTQ activations): percentile, KL and MSE over a histogram of ``|x|``.

The three histogram calibrators share :class:`HistogramCalibrator`, which accumulates a histogram
of ``|x|`` on the fly, without storing activations. Its range is a power of two, ``[0, 2**e)``,
where ``e`` is the smallest exponent whose range holds every value seen so far. When a batch needs
a larger range, the counts merge in groups of ``2**k`` bins: the bin edges are nested, so the
histogram is exactly the one that histogramming every value at the final range would give, whatever
the order of the batches. Two ranks that calibrate halves of a data set therefore get, after
:meth:`HistogramCalibrator.expand_range` to the larger exponent and summing the counts, exactly the
histogram (and the thresholds) of one rank that saw everything.

The thresholds are computed from that histogram, vectorised over all candidate thresholds, by
the functions of ``qtrainer.quant.observers.thresholds``.
"""
from __future__ import annotations

import logging
import math
import numbers
import zlib

import numpy as np
import paddle

from qtrainer._checks import check_positive_int
from qtrainer.quant.base import Observer
from qtrainer.quant.observers.thresholds import check_percent, kl_threshold, mse_threshold, percentile_threshold

__all__ = ["HistogramCalibrator", "HistCalibrator", "KLCalibrator", "MSECalibrator", "ZERO_THRESHOLD"]

logger = logging.getLogger(__name__)

#: The histogram range is ``[0, 2**range_exp)``; exponents are clamped to this interval.
MIN_RANGE_EXP, MAX_RANGE_EXP = -100, 100
#: ``range_exp`` of a histogram that has only seen zeros (or nothing): below every real range.
EMPTY_RANGE_EXP = MIN_RANGE_EXP - 1
#: Largest number of accumulated bins (``bins * upsample_bins``); keeps bin indices exact in float32.
MAX_FINE_BINS = 2**24
#: Threshold returned when every observed value was zero (any positive threshold is exact then).
ZERO_THRESHOLD = 1e-8


def _item(t: paddle.Tensor) -> int:
    """The single integer of a shape-[1] buffer."""
    return int(t.numpy().reshape(-1)[0])



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
        self.bins = check_positive_int("bins", bins)
        self.upsample_bins = check_positive_int("upsample_bins", upsample_bins)
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
        self.require_observed()
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
        self.require_observed()
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
        self.hist_percent = check_percent(hist_percent)

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
