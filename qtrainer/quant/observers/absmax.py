"""Abs-max observers: statistics of the tensors they see, turned into a scale (a threshold ``T``).

Three observers cover what QAT needs, and one of them PTQ's ``AbsmaxQuantizer``:

* ``AbsMaxObserver`` -- per tensor. By default it keeps the abs max of the *last* tensor it saw
  (QAT's ``'abs_max'`` activations: each training batch is quantized with its own abs max, and the
  last one seen is what eval and export use). With ``accumulate=True`` it keeps the running max of
  everything it saw; ``AbsmaxCalibrator`` is that running max for PTQ calibration (it also refuses
  non-finite activations and has no scale before it observed anything).
* ``MovingAverageAbsMaxObserver`` -- per tensor, Paddle's ``moving_average_abs_max`` semantics:
  ``state = rate * state + 1``, ``accum = rate * accum + absmax(x)``, ``scale = accum / state``.
  The first observation gives exactly that tensor's abs max (no bias toward the zero start).
* ``PerChannelAbsMaxObserver`` -- abs max along one axis (channel-wise weights), vectorised.

``record(absmax)`` takes an abs max computed elsewhere (the fused weight kernels of
``qtrainer.quant.quanters.fused``), so the buffer is only ever written here.

Every statistic is a *persistable buffer*, so it is in ``state_dict`` (a resumed run continues
exactly) and can be all-reduced across ranks: ``sync_modes()`` tells how (``'max'`` or ``'mean'``).
Nothing here calls ``.numpy()`` or ``.item()``; ``has_observed()`` is the one method that reads a
value back to Python and is meant for checks outside the training step.
"""
from __future__ import annotations

import math

import numpy as np
import paddle
from paddle import _C_ops

from qtrainer.quant.base import Observer

__all__ = [
    "AbsMaxObserver",
    "AbsmaxCalibrator",
    "MovingAverageAbsMaxObserver",
    "PerChannelAbsMaxObserver",
    "MIN_SCALE",
]

# Smallest scale ever returned: an all-zero tensor (or an observer that saw nothing) must not make
# the quantizer divide by zero.
MIN_SCALE = 1e-8
# Initial value of abs-max buffers: negative means "nothing observed yet" (abs max is >= 0), and it
# is neutral for a running max and for a max all-reduce.
_UNOBSERVED = -1.0
_FLOAT_MAX = 3.4e38


def _abs_max(x: paddle.Tensor) -> paddle.Tensor:
    """Abs max of a whole tensor, 0-d (two reductions, no full-size ``|x|`` temporary)."""
    return paddle.maximum(x.max(), -x.min())


def _persistable(layer: paddle.nn.Layer, name: str, value: float, shape: list[int]) -> paddle.Tensor:
    buf = paddle.full(shape, value, dtype="float32")
    layer.register_buffer(name, buf, persistable=True)
    return buf


class _AbsMax(Observer):
    """The one running abs max: an ``absmax`` buffer that keeps the last or the largest value seen."""

    bounds_observed = True  # scale() >= |x| for the tensor just observed

    def record(self, current: paddle.Tensor) -> None:
        """Take ``current`` (an abs max of the right shape, without gradient) as the newest one."""
        if self.accumulate:
            current = paddle.maximum(current, self.absmax)
        paddle.assign(current, output=self.absmax)

    def sync_modes(self) -> dict[str, str]:
        """How each buffer is combined across ranks."""
        return {"absmax": "max"}


class AbsMaxObserver(_AbsMax):
    """Per-tensor abs max: of the last tensor seen, or (``accumulate=True``) of all tensors seen."""

    def __init__(self, quant_bits: int = 8, accumulate: bool = False) -> None:
        super().__init__(quant_bits=quant_bits, axis=None)
        self.accumulate = bool(accumulate)
        _persistable(self, "absmax", _UNOBSERVED, [1])

    def observe(self, x: paddle.Tensor) -> None:
        self.record(_abs_max(x).reshape([1]))

    def scale(self) -> paddle.Tensor:
        return paddle.clip(self.absmax, min=MIN_SCALE)

    def has_observed(self) -> bool:
        return bool(self.absmax.item() >= 0.0)

    def extra_repr(self) -> str:
        return f"quant_bits={self.quant_bits}, accumulate={self.accumulate}"


class MovingAverageAbsMaxObserver(Observer):
    """Per-tensor moving average of the abs max, with Paddle's bias-free ``state`` counter."""

    def __init__(self, quant_bits: int = 8, moving_rate: float = 0.9) -> None:
        super().__init__(quant_bits=quant_bits, axis=None)
        moving_rate = float(moving_rate)
        if not 0.0 < moving_rate < 1.0:
            raise ValueError(
                f"moving_rate={moving_rate!r} must be a float strictly between 0 and 1 "
                "(0.9 is the usual value)"
            )
        self.moving_rate = moving_rate
        _persistable(self, "accum", 0.0, [1])
        _persistable(self, "state", 0.0, [1])

    def observe(self, x: paddle.Tensor) -> None:
        rate = self.moving_rate
        self.state.scale_(rate, 1.0)  # state = rate * state + 1
        self.accum.scale_(rate).add_(_abs_max(x))  # accum = rate * accum + absmax

    def scale(self) -> paddle.Tensor:
        # state >= 1 once anything was observed; before that the scale is MIN_SCALE.
        # (_C_ops.clip: paddle.clip's Python wrapper costs more than the op on a [1] tensor.)
        accum = _C_ops.clip(self.accum, MIN_SCALE, _FLOAT_MAX)
        return accum / _C_ops.clip(self.state, 1.0, _FLOAT_MAX)

    def has_observed(self) -> bool:
        return bool(self.state.item() > 0.0)

    def sync_modes(self) -> dict[str, str]:
        return {"accum": "mean", "state": "mean"}

    def extra_repr(self) -> str:
        return f"quant_bits={self.quant_bits}, moving_rate={self.moving_rate}"


class AbsmaxCalibrator(AbsMaxObserver):
    """PTQ's ``AbsmaxQuantizer``: threshold = the largest ``|x|`` seen during calibration (per tensor).

    The running max of ``AbsMaxObserver(accumulate=True)``; besides, a non-finite activation
    raises ``ValueError``, an empty one is ignored, and ``scale()`` raises before anything was seen.
    """

    def __init__(self, quant_bits: int = 8) -> None:
        super().__init__(quant_bits=quant_bits, accumulate=True)

    def observe(self, x: paddle.Tensor) -> None:
        if x.size == 0:
            return
        current = _abs_max(x.astype("float32")).reshape([1])
        value = float(current.numpy()[0])
        if not math.isfinite(value):
            raise ValueError(f"{type(self).__name__} observed a non-finite activation (max |x| = {value})")
        self.record(current)

    def scale(self) -> paddle.Tensor:
        self.require_observed()
        return super().scale()

    def extra_repr(self) -> str:
        return f"quant_bits={self.quant_bits}"

    @staticmethod
    def upgrade_state_dict(state_dict: dict, prefix: str) -> None:
        """Checkpoints before the redesign kept ``abs_max`` and a ``seen`` count: now one ``absmax``
        (negative until something was observed)."""
        if prefix + "abs_max" not in state_dict or prefix + "absmax" in state_dict:
            return
        value = np.asarray(state_dict.pop(prefix + "abs_max"), dtype="float32").reshape([1])
        seen = np.asarray(state_dict.pop(prefix + "seen", [1])).reshape(-1)
        state_dict[prefix + "absmax"] = value if int(seen[0]) > 0 else np.full([1], _UNOBSERVED, "float32")


class PerChannelAbsMaxObserver(_AbsMax):
    """Abs max per slice along ``axis`` (e.g. axis 0 of a Conv2D weight, axis 1 of a Linear weight).

    ``channels`` (the size of ``axis``) allocates the buffer up front so that a ``state_dict`` loads
    into a freshly quantized model; without it the buffer is created at the first observation.
    ``accumulate`` as in ``AbsMaxObserver``.
    """

    def __init__(
        self,
        quant_bits: int = 8,
        axis: int = 0,
        channels: int | None = None,
        accumulate: bool = False,
    ) -> None:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis={axis!r} must be an int (the channel axis)")
        super().__init__(quant_bits=quant_bits, axis=axis)
        self.accumulate = bool(accumulate)
        self.channels = channels
        if channels is not None:
            _persistable(self, "absmax", _UNOBSERVED, [int(channels)])

    def _absmax(self) -> paddle.Tensor | None:
        return self._buffers.get("absmax")

    def observe(self, x: paddle.Tensor) -> None:
        ndim = x.ndim
        axis = self.axis if self.axis >= 0 else self.axis + ndim
        if not 0 <= axis < ndim:
            raise ValueError(f"axis={self.axis} is out of range for a tensor of shape {x.shape}")
        reduce_axes = [d for d in range(ndim) if d != axis]
        if reduce_axes:  # two reductions, no full-size |x| temporary
            current = paddle.maximum(x.amax(axis=reduce_axes), -x.amin(axis=reduce_axes))
        else:
            current = x.abs()
        self.record(current, shape=x.shape)

    def record(self, current: paddle.Tensor, shape: list[int] | None = None) -> None:
        """As ``_AbsMax.record``; allocates the buffer at the first value (``shape``: for the error)."""
        if self._absmax() is None:
            self.channels = int(current.shape[0])
            _persistable(self, "absmax", _UNOBSERVED, [self.channels])
        elif current.shape[0] != self.absmax.shape[0]:
            raise ValueError(
                f"PerChannelAbsMaxObserver expected {self.absmax.shape[0]} channels along axis "
                f"{self.axis}, got {'a tensor of shape ' + str(shape) if shape else str(current.shape[0])}"
            )
        super().record(current)

    def scale(self) -> paddle.Tensor:
        if self._absmax() is None:
            raise RuntimeError("PerChannelAbsMaxObserver has no scale yet: it has observed nothing")
        return paddle.clip(self.absmax, min=MIN_SCALE)

    def has_observed(self) -> bool:
        return self._absmax() is not None and bool(self.absmax.min().item() >= 0.0)

    def extra_repr(self) -> str:
        return (
            f"quant_bits={self.quant_bits}, axis={self.axis}, channels={self.channels}, "
            f"accumulate={self.accumulate}"
        )
