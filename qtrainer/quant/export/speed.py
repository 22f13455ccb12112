"""The export's speed check: the int8 model against the same model in float, on this machine.

``measure_speed(int8_prefix, fp32_prefix, batch)`` times both Paddle Inference predictors
(oneDNN int8 and oneDNN fp32, the same thread count) in interleaved rounds within a time budget
and returns the medians and their ratio. ``slow_int8_warning`` words the warning the export logs
when int8 is not faster, naming the layers that keep it from running int8 end to end.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import numpy as np

from qtrainer.quant.export.inference import create_predictor, predict
from qtrainer.quant.export.isa import int8_isa

__all__ = ["measure_speed", "slow_int8_warning"]

_WARMUP_RUNS = 2
_MAX_ROUNDS = 200


def _time_one(predictor: Any, batch: Sequence[np.ndarray]) -> float:
    start = time.perf_counter()
    predict(predictor, list(batch))
    return (time.perf_counter() - start) * 1000.0


def measure_speed(int8_prefix: str, fp32_prefix: str, batch: Sequence[np.ndarray], num_threads: int = 1,
                  budget_seconds: float = 1.0) -> dict[str, Any]:
    """Median latency (ms) of the int8 and the fp32 model on ``batch``, measured alternately.

    Each round runs each model once, after two warm-up runs (oneDNN builds its kernels on the
    first ones); rounds go on until ``budget_seconds`` have passed (at least 3, at most 200).
    """
    fp32 = create_predictor(fp32_prefix, int8=False, num_threads=num_threads)
    int8 = create_predictor(int8_prefix, int8=True, num_threads=num_threads)
    for _ in range(_WARMUP_RUNS):
        _time_one(fp32, batch)
        _time_one(int8, batch)
    fp32_ms, int8_ms = [], []
    deadline = time.perf_counter() + budget_seconds
    while len(fp32_ms) < 3 or (time.perf_counter() < deadline and len(fp32_ms) < _MAX_ROUNDS):
        fp32_ms.append(_time_one(fp32, batch))
        int8_ms.append(_time_one(int8, batch))
    fp32_median, int8_median = statistics.median(fp32_ms), statistics.median(int8_ms)
    return {
        "runtime": "paddle",
        "int8_isa": int8_isa(),
        "batch": int(batch[0].shape[0]),
        "num_threads": num_threads,
        "rounds": len(fp32_ms),
        "fp32_ms": round(fp32_median, 4),
        "int8_ms": round(int8_median, 4),
        "speedup": round(fp32_median / int8_median, 3) if int8_median > 0 else None,
    }


def slow_int8_warning(speed: dict[str, Any], kept_float: Sequence[str], float_output: Sequence[str]) -> str | None:
    """The warning for an int8 model no faster than fp32 (None when it is faster)."""
    ratio = speed.get("speedup")
    if ratio is None or ratio > 1.0:
        return None
    causes = []
    if kept_float:
        causes.append(f"layers not int8: {', '.join(kept_float[:8])}{', ...' if len(kept_float) > 8 else ''}")
    if float_output:
        causes.append(
            f"int8 convolutions writing fp32 before a float residual add: {', '.join(float_output[:8])}"
            f"{', ...' if len(float_output) > 8 else ''}"
        )
    return (
        f"int8 is not faster than fp32 here: {speed['int8_ms']:.3g} ms vs {speed['fp32_ms']:.3g} ms "
        f"(x{ratio:.2f}, batch {speed['batch']}, {speed['num_threads']} thread(s), {speed['int8_isa']})"
        + (f"; {'; '.join(causes)}" if causes else "; every layer is int8 (small layers may be faster in float)")
    )
