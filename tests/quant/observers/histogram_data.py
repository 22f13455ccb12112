"""Activation batches for the histogram-calibrator tests (shared by test_histogram and test_thresholds)."""
from __future__ import annotations

import numpy as np
import paddle


def batches(seed: int = 0, n: int = 6, kind: str = "gaussian") -> list[np.ndarray]:
    """Batches whose magnitude grows and shrinks, so the histogram range changes several times."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if kind == "gaussian":
            b = rng.standard_normal((8, 4, 16, 16))
        elif kind == "laplace":
            b = rng.laplace(size=(8, 4, 16, 16))
        else:  # relu of a gaussian: half exact zeros
            b = np.maximum(rng.standard_normal((8, 4, 16, 16)), 0.0)
        out.append((b * [0.3, 5.0, 1.0, 40.0, 0.01, 2.0][i % 6]).astype("float32"))
    return out


def observe(obs, batches):
    for b in batches:
        obs(paddle.to_tensor(b))
    return obs


def scale(obs) -> float:
    return float(obs.scale().numpy()[0])
