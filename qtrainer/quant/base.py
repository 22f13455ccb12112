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

    def extra_repr(self) -> str:
        return f"quant_bits={self.quant_bits}, axis={self.axis}"


class Quanter(nn.Layer):
    """Fake-quantizes its input in ``forward`` with a straight-through gradient.

    ``quant_bits`` and ``axis`` (``None`` = per tensor) describe the integer format; ``scale()``
    returns the threshold used in the last forward (what the export writes).
    """

    def __init__(self, quant_bits: int = 8, axis: int | None = None) -> None:
        super().__init__()
        self.quant_bits = check_bits(quant_bits, "quant_bits")
        self.axis = axis

    def scale(self) -> paddle.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"quant_bits={self.quant_bits}, axis={self.axis}"
