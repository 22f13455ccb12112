"""Signal-to-quantization-noise ratios and the small helpers the per-layer reports share."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import paddle

__all__ = ["SqnrAccumulator", "finite_or_none", "first_tensor"]


def finite_or_none(value: Any) -> Any:
    """``value``, or None for an infinite/NaN float (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class SqnrAccumulator:
    """Sums of squared signal and error, in float64; ``sqnr_db()`` of what was added."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.error = 0.0

    def add(self, reference: paddle.Tensor, value: paddle.Tensor) -> None:
        ref = np.asarray(reference.numpy(), dtype=np.float64)
        val = np.asarray(value.numpy(), dtype=np.float64)
        self.signal += float(np.sum(ref * ref))
        self.error += float(np.sum((ref - val) ** 2))

    def sqnr_db(self) -> float | None:
        if self.signal == 0.0 and self.error == 0.0:
            return None
        if self.error == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.error)


def first_tensor(out: Any) -> paddle.Tensor | None:
    """The first Tensor of a model output (a Tensor, or nested lists/tuples/dicts of them)."""
    if isinstance(out, paddle.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out:
        return first_tensor(out[0])
    if isinstance(out, dict) and out:
        return first_tensor(out[sorted(out)[0]])
    return None
