"""``FusedAbsMaxQuanter``: a weight quanter that observes and fake-quantizes in one Paddle kernel.

For a quanter whose scale is the abs max of the tensor it quantizes (the weight quanters the
wrapping builds), Paddle's fused abs-max kernels compute the abs max (per tensor, or per channel
along axis 0 or 1) and quantize with it in one pass. The result is identical to observing and then
``fake_quant``: every value is within its own abs max, so the clipped straight-through gradient is
the identity, which is the kernel's gradient. The abs max is handed to the observer
(``record``), so eval, export and checkpoints see the same state as with a ``FakeQuanter``.
Outside dygraph (tracing), when not observing or not quantizing, it is a plain ``FakeQuanter``.
"""
from __future__ import annotations

import paddle
from paddle import _C_ops
from paddle.framework import in_dynamic_mode

from qtrainer.quant.observers.absmax import AbsMaxObserver, PerChannelAbsMaxObserver
from qtrainer.quant.quanters.fake_quant import FakeQuanter, snap_to_int8_grid

__all__ = ["FusedAbsMaxQuanter"]

# Fused abs-max fake quant-dequant kernels (Paddle's own QAT ops).
_FUSED_ABS_MAX = getattr(_C_ops, "fake_quantize_dequantize_abs_max", None)
_FUSED_CHANNEL = getattr(_C_ops, "fake_channel_wise_quantize_dequantize_abs_max", None)
_ROUND_HALF_TO_EVEN = 0  # Paddle's round_type 0 (its clip range is [-qmax-1, qmax])


class FusedAbsMaxQuanter(FakeQuanter):
    """A ``FakeQuanter`` of a last-seen abs-max observer whose observe+quantize step is one kernel.

    ``observer`` must be an ``AbsMaxObserver`` or a ``PerChannelAbsMaxObserver`` (axis 0 or 1),
    with ``accumulate=False``; other arguments as ``FakeQuanter`` (default ``observe='always'``,
    what a weight quanter does).
    """

    def __init__(self, observer: AbsMaxObserver | PerChannelAbsMaxObserver, observe: str = "always",
                 quantize: bool = True, int8_grid: bool = False) -> None:
        per_tensor = type(observer) is AbsMaxObserver
        per_channel = type(observer) is PerChannelAbsMaxObserver and observer.axis in (0, 1)
        if not (per_tensor or per_channel) or observer.accumulate:
            raise TypeError(
                "FusedAbsMaxQuanter needs an AbsMaxObserver or a PerChannelAbsMaxObserver along axis 0 or 1, "
                f"with accumulate=False; got {observer!r} (use FakeQuanter for it)"
            )
        super().__init__(observer, observe=observe, quantize=quantize, int8_grid=int8_grid)
        kernel = _FUSED_ABS_MAX if per_tensor else _FUSED_CHANNEL
        self._fused = None if kernel is None else (self._per_tensor if per_tensor else self._per_channel)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self._fused is not None and self.quantize_enabled and self._observes_now() and in_dynamic_mode():
            return self._fused(x)
        return super().forward(x)

    def _per_tensor(self, x: paddle.Tensor) -> paddle.Tensor:
        out, scale = _FUSED_ABS_MAX(x, self.quant_bits, _ROUND_HALF_TO_EVEN)
        self._record(scale.reshape([1]))
        return snap_to_int8_grid(out, scale) if self.int8_grid else out

    def _per_channel(self, x: paddle.Tensor) -> paddle.Tensor:
        out, scale = _FUSED_CHANNEL(x, self.quant_bits, _ROUND_HALF_TO_EVEN, self.axis)
        self._record(scale)
        return snap_to_int8_grid(out, scale, self.axis) if self.int8_grid else out

    def _record(self, absmax: paddle.Tensor) -> None:
        with paddle.no_grad():
            self.observer.record(absmax.detach())
        if not self._seen:  # Layer.__setattr__ is slow: set once
            self._seen = True
