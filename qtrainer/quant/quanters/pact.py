"""PACT: a learnable clipping value ``alpha`` applied before quantization.

``PACT`` maps ``x`` to ``x - relu(x - a) + relu(-a - x)`` (that is ``clip(x, -a, a)``) with
``a = |alpha|``. Its gradient is that formula's: ``dy/dx = 1`` inside ``[-a, a]`` and 0 outside;
``dy/dalpha`` is the sum of the upstream gradient over values above ``a`` minus the sum over values
below ``-a``. It runs as one clip in the forward pass and a few ops in the backward pass (a
``PyLayer``), cheaper than the six-op relu form it equals. A quanted layer runs PACT and the
quantization as one fused step (``pact_fake_quant``: two new tensors forward, none backward).

When PACT precedes an activation quanter, the quantization threshold *is* ``a``:
``PACTQuanter`` fake-quantizes with ``T = |alpha|`` and its ``scale()`` returns it, so an export
writes ``alpha`` as the activation scale and needs no extra ops.

Defaults, and why. The gradient to ``alpha`` is a *sum* over every clipped value of the batch, so
it is huge when ``alpha`` is small (most values clipped) and zero when ``alpha`` is above every
value. PaddleSlim starts ``alpha`` at 100 with a 1000x learning-rate multiplier (dygraph), which
makes the first epochs quantize with a far too coarse step while weight decay drags ``alpha`` down.
qtrainer instead starts ``alpha`` where the data is: with ``init_value=None`` (the default) ``alpha``
follows the moving-average abs max of the activation (the same statistic as the
``moving_average_abs_max`` quantizer) during the first ``warmup_steps`` training forwards and is
learned from then on; so QAT starts exactly like the default quantizer, and a stray forward on
unrepresentative data (``paddle.summary`` runs one on random input in training mode) is averaged
away. During the warm-up ``alpha`` takes no part in the training graph and gets no gradient (nor
optimizer state); the layer declares it (``may_leave_parameters_unused``), so a data-parallel
strategy lets ``paddle.DataParallel`` find unused parameters. ``lr_mult`` (default 1) multiplies the optimizer's learning rate for
``alpha``; ``decay`` (default None = whatever the optimizer applies) sets an L2 regularizer on
``alpha`` alone, the downward pull of the PACT paper. PaddleSlim's dygraph behaviour is ``PACT(init_value=100,
lr_mult=1000)``.
"""
from __future__ import annotations

import logging

import paddle
from paddle import _C_ops, nn
from paddle.autograd import PyLayer
from paddle.framework import in_dynamic_mode

from qtrainer.quant.base import Quanter, check_bits, qmax_for_bits
from qtrainer.quant.observers.absmax import MIN_SCALE, MovingAverageAbsMaxObserver
from qtrainer.quant.quanters.fake_quant import fake_quant

__all__ = ["PACT", "PACTQuanter", "pact_clip", "pact_fake_quant"]

logger = logging.getLogger(__name__)


class _PACTClip(PyLayer):
    @staticmethod
    def forward(ctx, x, a):
        clipped = paddle.clip(x, -a, a)
        ctx.x_needs_grad = not x.stop_gradient
        ctx.save_for_backward(x, clipped)
        return clipped

    @staticmethod
    def backward(ctx, dy):
        x, clipped = ctx.saved_tensor()
        over = paddle.sign(x - clipped)  # +1 above a, -1 below -a, 0 inside
        dy_over = dy * over
        d_a = dy_over.sum().reshape([1])
        d_x = dy - dy_over * over if ctx.x_needs_grad else None
        return d_x, d_a


# Multiplying a nonzero overflow x - clip(x) by this and clipping to [-1, 1] gives its sign in place
# (every nonzero overflow is at least one float32 ulp of alpha >= MIN_SCALE, far above 1e-38).
_SIGN_GAIN = 1e38


class _PACTFakeQuant(PyLayer):
    """PACT clip + fake quant with threshold ``a`` in one step: two allocations in the forward
    pass, none in the backward pass (the saved overflow signs become ``dx`` in place)."""

    @staticmethod
    def forward(ctx, x, a, qmax):
        out = paddle.clip(x, -a, a)
        sign = x - out  # 0 inside [-a, a], the overflow outside
        _C_ops.scale_(sign, _SIGN_GAIN, 0.0, True)
        sign.clip_(-1.0, 1.0)  # -> +1 above a, -1 below -a, 0 inside
        _C_ops.scale_(out, qmax / a, 0.0, True)  # quantize-dequantize in place
        out.round_()
        _C_ops.scale_(out, a / qmax, 0.0, True)
        ctx.x_needs_grad = not x.stop_gradient
        ctx.save_for_backward(sign)
        return out

    @staticmethod
    def backward(ctx, dy):
        (sign,) = ctx.saved_tensor()
        # sum(dy * sign) as a [1, n] x [n, 1] matmul: BLAS, no temporary (paddle.dot is 5x slower)
        d_a = paddle.matmul(dy.reshape([1, -1]), sign.reshape([-1, 1])).reshape([1])
        if not ctx.x_needs_grad:
            return None, d_a
        # Reusing the saved buffer is safe: Paddle runs a PyLayer's backward at most once
        # (a second backward through a retained graph is not supported by PyLayer at all).
        d_x = sign.abs_()
        _C_ops.scale_(d_x, -1.0, 1.0, True)  # 1 inside, 0 where clipped
        return d_x.multiply_(dy), d_a


def pact_fake_quant(x: paddle.Tensor, alpha: paddle.Tensor, bits: int) -> paddle.Tensor:
    """``fake_quant(pact_clip(x, alpha), |alpha|, bits)`` with the same gradients, fused."""
    return _PACTFakeQuant.apply(x, alpha.abs(), float(qmax_for_bits(bits)))


def pact_clip(x: paddle.Tensor, alpha: paddle.Tensor) -> paddle.Tensor:
    """``clip(x, -|alpha|, |alpha|)`` with PACT's gradient to ``x`` and ``alpha`` (shape ``[1]``)."""
    return _PACTClip.apply(x, alpha.abs())


class PACT(nn.Layer):
    """Learnable symmetric clipping ``clip(x, -|alpha|, |alpha|)``; see the module docstring.

    Args:
        init_value: starting ``alpha``; ``None`` = learn from the data (moving-average abs max
            during the first ``warmup_steps`` training forwards).
        lr_mult: learning-rate multiplier of ``alpha``.
        decay: L2 coefficient for ``alpha`` alone (``None`` = the optimizer's weight decay).
        warmup_steps: length of the data-driven start (only with ``init_value=None``; at least 1).
        moving_rate: moving-average rate during the warm-up.

    ``record_clipping = True`` stores the fraction of input values beyond ``|alpha|`` of each
    forward in ``last_clip_fraction`` (for logging; off by default).
    """

    def __init__(
        self,
        init_value: float | None = None,
        lr_mult: float = 1.0,
        decay: float | None = None,
        warmup_steps: int = 100,
        moving_rate: float = 0.9,
    ) -> None:
        super().__init__()
        if init_value is not None and not float(init_value) > 0.0:
            raise ValueError(f"PACT init_value={init_value!r} must be a positive number or None")
        if not float(lr_mult) > 0.0:
            raise ValueError(f"PACT lr_mult={lr_mult!r} must be a positive number")
        if decay is not None and float(decay) < 0.0:
            raise ValueError(f"PACT decay={decay!r} must be >= 0 or None")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"PACT warmup_steps={warmup_steps!r} must be an integer >= 0")
        self.init_value = None if init_value is None else float(init_value)
        self.lr_mult = float(lr_mult)
        self.decay = None if decay is None else float(decay)
        regularizer = None if decay is None else paddle.regularizer.L2Decay(float(decay))
        attr = paddle.ParamAttr(
            learning_rate=self.lr_mult,
            regularizer=regularizer,
            initializer=nn.initializer.Constant(self.init_value or 1.0),
        )
        self.alpha = self.create_parameter(shape=[1], dtype="float32", attr=attr)
        self.record_clipping = False
        self.last_clip_fraction: paddle.Tensor | None = None
        if self.init_value is None:
            self.warmup_steps = max(1, warmup_steps)
            self.observer = MovingAverageAbsMaxObserver(quant_bits=8, moving_rate=moving_rate)
            self.register_buffer(
                "warmup_count", paddle.zeros([1], dtype="float32"), persistable=True
            )
            self._warmup_done = False
        else:
            self.warmup_steps = 0
            self.observer = None
            self._warmup_done = True

    def in_warmup(self) -> bool:
        """True while ``alpha`` still follows the data instead of being learned.

        Reads the ``warmup_count`` buffer (so a loaded checkpoint is honoured) until the warm-up
        is over, and never again after that.
        """
        if self._warmup_done:
            return False
        self._warmup_done = self.warmup_count.item() >= self.warmup_steps
        return not self._warmup_done

    def _warmup_observe(self, x: paddle.Tensor) -> None:
        self.observer(x)
        with paddle.no_grad():
            paddle.assign(self.observer.scale(), output=self.alpha)
            self.warmup_count.add_(paddle.ones([1], dtype="float32"))

    def is_ready(self) -> bool:
        """True when ``alpha`` holds a scale: given, learned, or set from data at least once."""
        return self.observer is None or not self.in_warmup() or self.observer.has_observed()

    def _warmup_threshold(self, x: paddle.Tensor) -> paddle.Tensor | None:
        """During the warm-up, update alpha from ``x`` (training) and return it detached."""
        if not in_dynamic_mode() or not self.in_warmup():  # a traced graph uses alpha as is
            return None
        if self.training or not self.observer.has_observed():
            if not self.training:
                logger.warning(
                    "%s: PACT alpha was never initialised from data; using this input",
                    self.full_name(),
                )
            self._warmup_observe(x)
        return self.threshold()

    @property
    def may_leave_parameters_unused(self) -> bool:
        """True when ``alpha`` can go without a gradient in a training step (its data-driven warm-up).

        A layer-level declaration that data-parallel strategies read (``DataParallel`` must then
        look for unused parameters); nothing else changes.
        """
        return self.warmup_steps > 0

    def _record(self, x: paddle.Tensor) -> None:
        if self.record_clipping:
            with paddle.no_grad():
                self.last_clip_fraction = (
                    (x.detach().abs() > self.threshold()).astype("float32").mean()
                )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        self._record(x)
        a = self._warmup_threshold(x)
        if a is None and self.training:
            return pact_clip(x, self.alpha)
        a = self.threshold() if a is None else a
        return paddle.clip(x, -a, a)

    def clip_and_fake_quant(self, x: paddle.Tensor, bits: int) -> paddle.Tensor:
        """``fake_quant(self(x), |alpha|, bits)``, fused (what a quanted layer with PACT runs)."""
        self._record(x)
        a = self._warmup_threshold(x)
        if a is None and self.training and in_dynamic_mode():
            return pact_fake_quant(x, self.alpha, bits)
        return fake_quant(x, self.threshold() if a is None else a, bits)

    def sync_modes(self) -> dict[str, str]:
        """How this layer's state is combined across ranks (data-driven alpha differs per rank)."""
        modes = {"alpha": "mean"}
        if self.observer is not None:
            modes["warmup_count"] = "max"
            modes.update({f"observer.{k}": v for k, v in self.observer.sync_modes().items()})
        return modes

    def threshold(self) -> paddle.Tensor:
        """``|alpha|`` (detached, at least ``MIN_SCALE``): the clipping value."""
        return paddle.clip(self.alpha.detach().abs(), min=MIN_SCALE)

    def extra_repr(self) -> str:
        return (
            f"init_value={self.init_value}, lr_mult={self.lr_mult}, decay={self.decay}, "
            f"warmup_steps={self.warmup_steps}"
        )


class PACTQuanter(Quanter):
    """Fake-quantizes with the threshold ``|alpha|`` of a ``PACT`` layer that precedes it.

    The PACT layer is owned elsewhere (the quanted layer's ``act_preprocess``); this quanter only
    reads its ``alpha``, so ``alpha`` appears once in the ``state_dict``. Its input must already be
    clipped by that PACT layer.
    """

    def __init__(self, pact: PACT, quant_bits: int = 8) -> None:
        if not isinstance(pact, PACT):
            raise TypeError(f"PACTQuanter needs a PACT layer, got {type(pact).__name__}")
        super().__init__(quant_bits=check_bits(quant_bits, "quant_bits"), axis=None)
        self._pact = (pact,)  # a tuple, so that Paddle does not register it as a sublayer

    @property
    def pact(self) -> PACT:
        return self._pact[0]

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Fake-quantize ``x``, already clipped by the PACT layer, with ``T = |alpha|``."""
        return fake_quant(x, self.scale(), self.quant_bits)

    def clip_and_quantize(self, x: paddle.Tensor) -> paddle.Tensor:
        """``self(pact(x))`` in one fused step (used by the quanted layers)."""
        return self.pact.clip_and_fake_quant(x, self.quant_bits)

    @property
    def observing(self) -> bool:
        """True while PACT's warm-up sets ``alpha`` from the data."""
        return self.pact.observer is not None and self.pact.in_warmup()

    def is_ready(self) -> bool:
        return self.pact.is_ready()

    def scale(self) -> paddle.Tensor:
        return self.pact.threshold()
