"""The two contracts of the quantization engine: ``Observer`` and ``Quanter``.

An *observer* watches tensors and turns what it saw into a scale. A *quanter* uses a scale to
fake-quantize (quantize then dequantize) a tensor in the forward pass, with a straight-through
gradient. Keeping the two apart (as torch.ao.quantization does) lets QAT, PTQ and distributed
synchronisation share every statistic.

Scale convention, used everywhere in qtrainer: a scale is the clipping *threshold* ``T`` (an
absolute value, not divided by ``qmax``). A value ``x`` quantizes to
``q = clip(round(x / T * qmax), -qmax, qmax)`` with ``qmax = 2 ** (bits - 1) - 1`` and dequantizes
to ``q * T / qmax``. Per-tensor scales have shape ``[1]``; per-channel scales have shape
``[channels]`` along the observer's ``axis``.
"""
from __future__ import annotations

import paddle
from paddle import nn

__all__ = ["Observer", "Quanter", "qmax_for_bits", "check_bits"]

MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: int, name: str = "bits") -> int:
    """Return ``bits`` when it is an integer in [2, 16]; raise a ``ValueError`` naming it otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"{name}={bits!r} is out of range: use an integer from {MIN_BITS} to {MAX_BITS} "
            f"(8 is the int8 deployment target; 16 keeps weights as int16)"
        )
    return bits


def qmax_for_bits(bits: int) -> int:
    """Largest positive integer code of a signed ``bits``-bit symmetric quantizer."""
    return 2 ** (check_bits(bits) - 1) - 1


class Observer(nn.Layer):
    """Collects statistics of the tensors passed to ``forward`` and computes a scale.

    Subclasses implement ``observe`` (update statistics from one tensor, without gradient) and
    ``scale`` (the threshold, see the module docstring). Statistics that must survive a
    checkpoint or be synchronised across ranks are *persistable buffers*, so they travel in the
    model's ``state_dict``.
    """

    def __init__(self, quant_bits: int = 8, axis: int | None = None) -> None:
        super().__init__()
        self.quant_bits = check_bits(quant_bits, "quant_bits")
        self.axis = axis

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        with paddle.no_grad():
            self.observe(x.detach())
        return x

    def observe(self, x: paddle.Tensor) -> None:
        raise NotImplementedError

    def scale(self) -> paddle.Tensor:
        raise NotImplementedError

    def has_observed(self) -> bool:
        """True once at least one tensor was observed (a scale exists)."""
        raise NotImplementedError

    def require_observed(self) -> None:
        """Raise ``RuntimeError`` unless a tensor was observed (for ``scale()`` of calibrators)."""
        if not self.has_observed():
            raise RuntimeError(
                f"{type(self).__name__}.scale() was called before any tensor was observed: "
                f"run at least one calibration batch through the model first"
            )

    def extra_repr(self) -> str:
        return f"quant_bits={self.quant_bits}, axis={self.axis}"


class Quanter(nn.Layer):
    """Fake-quantizes its input in ``forward`` with a straight-through gradient.

    ``quant_bits`` and ``axis`` (``None`` = per tensor) describe the integer format; ``scale()``
    returns the threshold used in the last forward (what the export writes).

    The protocol that PTQ, the export and the rank sync use instead of a quanter's internals:

    * ``observing`` / ``quantizing`` -- whether a forward updates the scale / fake-quantizes;
    * ``enable_observer(on)`` / ``enable_quant(on)`` -- switch them;
    * ``is_ready()`` -- a scale exists (something was observed, or the scale is a parameter);
    * ``follows_input`` -- the scale is recomputed from each input (a weight quanter's abs max), so
      it holds no state of its own that ranks would have to agree on;
    * ``observe(x)`` -- update the scale from ``x`` if observing, without quantizing;
    * ``freeze()`` -- stop observing and quantize with the current scale.
    The defaults describe a quanter whose scale is fixed (or learned), like PACT's.
    """

    follows_input = False

    def __init__(self, quant_bits: int = 8, axis: int | None = None) -> None:
        super().__init__()
        self.quant_bits = check_bits(quant_bits, "quant_bits")
        self.axis = axis

    def scale(self) -> paddle.Tensor:
        raise NotImplementedError

    @property
    def observing(self) -> bool:
        return False

    @property
    def quantizing(self) -> bool:
        return True

    def enable_observer(self, enabled: bool = True) -> "Quanter":
        return self

    def enable_quant(self, enabled: bool = True) -> "Quanter":
        return self

    def is_ready(self) -> bool:
        return True

    def observe(self, x: paddle.Tensor) -> None:
        """Update the scale from ``x`` (no-op unless observing)."""

    def freeze(self) -> "Quanter":
        self.enable_observer(False)
        return self.enable_quant(True)

    def extra_repr(self) -> str:
        return f"quant_bits={self.quant_bits}, axis={self.axis}"
