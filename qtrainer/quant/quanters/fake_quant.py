"""Fake quant-dequant with a straight-through gradient, and the ``FakeQuanter`` layer.

``fake_quant(x, threshold, bits, axis=None)`` returns
``clip(round(x / T * qmax), -qmax, qmax) * T / qmax`` (``T`` = ``threshold``, per tensor or per slice along ``axis``; rounding is half-to-even, like
NumPy and oneDNN). Its gradient is the *clipped* straight-through estimator: ``dy/dx = 1`` where
``|x| <= T`` and ``0`` outside. Values beyond the threshold are saturated in the forward pass (and
in the deployed int8 model), so moving them changes nothing and their gradient is zeroed, as in
PACT, LSQ and torch's ``FakeQuantize`` (Paddle's own fused ops pass the gradient everywhere).
Inside the range the rounding is ignored (``d round(u)/du := 1``). No gradient flows to ``T``
(observers set it; PACT trains its own ``alpha`` through its clipping, see ``pact.py``).

Speed: fake quant is memory-bound, and on CPU each fresh multi-megabyte tensor costs page faults,
so the dygraph path makes one new tensor (the clip, which also carries the gradient mask) and
rounds it in place; weights quantized with their own abs max use Paddle's fused abs-max kernels
(``FusedAbsMaxQuanter``, ``qtrainer.quant.quanters.fused``). Under ``paddle.jit`` tracing the same function emits standard ops only.

Weights with fewer than 8 bits (``int8_grid=True``, set for every weight quanter the wrapper builds):
Paddle's int8 CPU kernels hold a weight on the 255-level grid of its channel's abs max (a
channel's largest value becomes code 127, whatever was exported), so the 15 levels ``k * T / 7``
of a uniform 4-bit grid would deploy as ``round(k * 127 / 7) * T / 127``: up to half an int8 step
off, which on a 4-bit MobileNetV1 moved 11% of top-1 answers. ``snap_to_int8_grid`` makes the
simulation use those deployed levels (still ``2 * qmax + 1`` of them per channel, each within
``T / 254`` of the uniform level; the gradient passes straight through), so the deployed model
equals the simulated one.

``FakeQuanter`` holds an ``Observer`` and two switches:

* ``observe``: ``'train'`` (observe only in training mode: QAT), ``'always'`` (also in eval mode:
  PTQ calibration, and weights, whose scale follows the current weight every forward), or
  ``'never'`` (frozen scale).
* ``quantize``: ``True`` to fake-quantize, ``False`` to pass the input through (PTQ calibration
  observes only).

So QAT training = observe + quantize; eval = frozen scale + quantize; calibration = observe only.
The ``Quanter`` protocol (``qtrainer.quant.base``) reads and sets them for PTQ and the export.
"""
from __future__ import annotations

import logging

import paddle
from paddle import _C_ops  # direct kernels: clip without the wrapper, in-place scale by a Tensor
from paddle.autograd import PyLayer
from paddle.framework import in_dynamic_mode

from qtrainer.quant.base import Observer, Quanter, qmax_for_bits
from qtrainer.quant.observers.absmax import MIN_SCALE

__all__ = ["fake_quant", "fake_quant_reference", "snap_to_int8_grid", "FakeQuanter", "OBSERVE_MODES", "INT8_QMAX"]

logger = logging.getLogger(__name__)

OBSERVE_MODES = ("train", "always", "never")
_QMAX = {bits: float(2 ** (bits - 1) - 1) for bits in range(2, 17)}  # checked by qmax_for_bits
INT8_QMAX = _QMAX[8]  # the int8 codes Paddle's kernels hold: -127..127


def _qmax(bits: int) -> float:
    qmax = _QMAX.get(bits) if isinstance(bits, int) and not isinstance(bits, bool) else None
    return qmax if qmax is not None else float(qmax_for_bits(bits))  # raises for bad bits


def _broadcast_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def _normalise_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def fake_quant_reference(
    x: paddle.Tensor, threshold: paddle.Tensor, bits: int, axis: int | None = None
) -> paddle.Tensor:
    """The forward value of ``fake_quant`` in plain Paddle ops, without gradient (for checks)."""
    with paddle.no_grad():
        return _fake_quant_plain(x, threshold, bits, axis).detach()


def _fake_quant_plain(
    x: paddle.Tensor, threshold: paddle.Tensor, bits: int, axis: int | None
) -> paddle.Tensor:
    """``fake_quant`` in standard ops only (traceable by ``paddle.jit``), same value and gradient
    except exactly at ``|x| == T`` per channel (where the min/max gradient is 1/2)."""
    qmax = float(qmax_for_bits(bits))
    t = threshold.detach()
    if axis is None:
        clipped = paddle.clip(x, -t, t)
    else:
        t = t.reshape(_broadcast_shape(x.ndim, _normalise_axis(axis, x.ndim)))
        clipped = paddle.minimum(paddle.maximum(x, -t), t)
    quantized = paddle.round(clipped * (qmax / t)) * (t / qmax)
    return clipped + (quantized - clipped).detach()


class _MaskedIdentity(PyLayer):
    """A copy of ``x`` whose gradient is masked to ``|x| <= t`` (``t`` broadcasts against ``x``)."""

    @staticmethod
    def forward(ctx, x, t):
        ctx.save_for_backward(x, t)
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        x, t = ctx.saved_tensor()
        return dy * (x.abs() <= t).astype(dy.dtype)


def fake_quant(
    x: paddle.Tensor,
    threshold: paddle.Tensor,
    bits: int,
    axis: int | None = None,
    in_range: bool = False,
) -> paddle.Tensor:
    """Quantize then dequantize ``x`` with threshold ``threshold`` (see the module docstring).

    ``threshold`` has shape ``[1]`` for ``axis=None`` and ``[x.shape[axis]]`` otherwise.
    ``in_range=True`` promises ``|x| <= threshold`` everywhere (e.g. the threshold is ``x``'s own
    abs max), which lets the per-channel path skip the gradient mask.

    Implementation: one differentiable op makes a new tensor whose gradient is the mask (a clip
    per tensor; a masked copy per channel), then the rounding runs in place on that tensor,
    outside autograd: four full-size passes, one allocation.
    """
    if not in_dynamic_mode():  # being traced (paddle.jit): standard ops only
        return _fake_quant_plain(x, threshold, bits, axis)
    qmax = _qmax(bits)
    t = threshold.detach()
    if axis is None:
        out = _C_ops.clip(x, -t, t)  # paddle.clip's Python wrapper costs more than the op here
        buf = out.detach()  # shares memory with out; in-place ops on it are not recorded
        _C_ops.scale_(buf, qmax / t, 0.0, True)
        buf.round_()
        _C_ops.scale_(buf, t / qmax, 0.0, True)
        return out
    axis = _normalise_axis(axis, x.ndim)
    tb = t.reshape(_broadcast_shape(x.ndim, axis))
    out = x.clone() if in_range else _MaskedIdentity.apply(x, tb)
    buf = out.detach()
    buf.multiply_(qmax / tb)
    buf.clip_(-qmax, qmax)
    buf.round_()
    buf.multiply_(tb / qmax)
    return out


def snap_to_int8_grid(x_q: paddle.Tensor, threshold: paddle.Tensor, axis: int | None = None) -> paddle.Tensor:
    """Round fake-quantized values onto the int8 grid of ``threshold``: ``round(x_q / T * 127) * T / 127``.

    For values with fewer than 8 bits (see the module docstring). The gradient is the identity.
    In dynamic mode ``x_q`` must be a fresh tensor (``fake_quant``'s output): it is rounded in
    place and returned.
    """
    t = threshold.detach()
    if axis is not None:
        t = t.reshape(_broadcast_shape(x_q.ndim, _normalise_axis(axis, x_q.ndim)))
    t = paddle.clip(t, min=MIN_SCALE)  # as the observers' scale() and the export's weight codes
    if not in_dynamic_mode():
        return paddle.round(x_q / t * INT8_QMAX) * t / INT8_QMAX
    buf = x_q.detach()
    buf.multiply_(INT8_QMAX / t)
    buf.round_()
    buf.multiply_(t / INT8_QMAX)
    return x_q


class FakeQuanter(Quanter):
    """An ``Observer`` plus fake quant-dequant; see the module docstring for the two switches.

    If the quanter must quantize while its observer has never seen a tensor (a model evaluated
    before any training batch), it observes that first input rather than quantize with a
    meaningless scale, and logs it. ``record_clipping = True`` makes each quantizing forward of an
    activation store the fraction of input values beyond the threshold in ``last_clip_fraction``
    (a Tensor; costs two extra passes, so it is off by default and switched on only for logging
    steps).
    """

    def __init__(
        self, observer: Observer, observe: str = "train", quantize: bool = True, int8_grid: bool = False
    ) -> None:
        if not isinstance(observer, Observer):
            raise TypeError(
                f"FakeQuanter needs a qtrainer.quant.base.Observer, got {type(observer).__name__}"
            )
        super().__init__(quant_bits=observer.quant_bits, axis=observer.axis)
        self.observer = observer
        self.observe_mode = "train"
        self.set_mode(observe=observe, quantize=quantize)
        self.record_clipping = False
        self.last_clip_fraction: paddle.Tensor | None = None
        self._seen = False  # Python mirror of observer.has_observed(), to avoid syncs
        # below 8 bits, quantize onto the levels Paddle's int8 kernels deploy (module docstring)
        self.int8_grid = bool(int8_grid) and self.quant_bits < 8

    def quantize_with(self, x: paddle.Tensor, threshold: paddle.Tensor, in_range: bool = False) -> paddle.Tensor:
        """``x`` fake-quantized with ``threshold`` as this quanter's forward does (bits, axis, grid)."""
        out = fake_quant(x, threshold, self.quant_bits, self.axis, in_range=in_range)
        return snap_to_int8_grid(out, threshold, self.axis) if self.int8_grid else out

    def set_mode(self, observe: str | None = None, quantize: bool | None = None) -> "FakeQuanter":
        """Change the observe mode (one of ``OBSERVE_MODES``) and/or the quantize switch."""
        if observe is not None:
            if observe not in OBSERVE_MODES:
                raise ValueError(f"observe={observe!r} is not valid: use one of {OBSERVE_MODES}")
            self.observe_mode = observe
        if quantize is not None:
            self.quantize_enabled = bool(quantize)
        return self

    # -- the Quanter protocol ---------------------------------------------------------------
    @property
    def observing(self) -> bool:
        """True unless the scale is frozen (``'train'`` observes in training mode only)."""
        return self.observe_mode != "never"

    @property
    def quantizing(self) -> bool:
        return self.quantize_enabled

    @property
    def follows_input(self) -> bool:
        """The scale is the last input's abs max, recomputed every forward (the weight quanters)."""
        return self.observe_mode == "always" and getattr(self.observer, "accumulate", True) is False

    def enable_observer(self, enabled: bool = True) -> "FakeQuanter":
        """``observe='always'`` (on) or ``'never'`` (off)."""
        return self.set_mode(observe="always" if enabled else "never")

    def enable_quant(self, enabled: bool = True) -> "FakeQuanter":
        return self.set_mode(quantize=enabled)

    def is_ready(self) -> bool:
        """True once the observer saw a tensor (reads the buffer until then)."""
        if not self._seen:
            self._seen = self.observer.has_observed()
        return self._seen

    def observe(self, x: paddle.Tensor) -> None:
        """Update the observer from ``x`` when observing, without quantizing."""
        if self.observing:
            self.observer(x)
            if not self._seen:
                self._seen = True

    def _observes_now(self) -> bool:
        mode = self.observe_mode
        return mode == "always" or (mode == "train" and self.training)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        observed_now = self._observes_now()
        if observed_now:
            with paddle.no_grad():
                self.observer.observe(x.detach())
            if not self._seen:  # Layer.__setattr__ is slow: set once
                self._seen = True
        elif not self._seen and self.quantize_enabled and in_dynamic_mode():
            self._seen = self.observer.has_observed()  # e.g. loaded from a checkpoint
            if not self._seen:
                logger.warning(
                    "%s quantizes before its observer saw any tensor; using this input's "
                    "statistics as the scale",
                    self.full_name(),
                )
                self.observer(x)
                self._seen = True
        if not self.quantize_enabled:
            return x
        threshold = self.observer.scale()
        if self.record_clipping:
            self.last_clip_fraction = _clip_fraction(x, threshold, self.axis)
        # An abs-max observer that just saw x has a threshold >= |x| everywhere.
        in_range = observed_now and getattr(self.observer, "bounds_observed", False)
        return self.quantize_with(x, threshold, in_range=in_range)

    def scale(self) -> paddle.Tensor:
        return self.observer.scale().detach()

    def extra_repr(self) -> str:
        return (
            f"quant_bits={self.quant_bits}, axis={self.axis}, observe={self.observe_mode!r}, "
            f"quantize={self.quantize_enabled}" + (", int8_grid=True" if self.int8_grid else "")
        )


def _clip_fraction(x: paddle.Tensor, threshold: paddle.Tensor, axis: int | None) -> paddle.Tensor:
    """Fraction of ``x`` whose magnitude exceeds the threshold (a ``[1]``-shaped-or-scalar Tensor)."""
    with paddle.no_grad():
        t = threshold.detach()
        if axis is not None:
            t = t.reshape(_broadcast_shape(x.ndim, _normalise_axis(axis, x.ndim)))
        return (x.detach().abs() > t).astype("float32").mean()
