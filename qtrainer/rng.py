"""Seeding and capturing every random number generator a run uses."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import paddle

__all__ = ["seed_everything", "seed_data_rngs", "capture_rng_state", "restore_rng_state", "restore_paddle_rng_state"]


def seed_everything(seed: int) -> int:
    """Seed Python's ``random``, NumPy and Paddle with ``seed``; return it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r}: use an integer in [0, 2**32)")
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
    return seed


def seed_data_rngs(base_seed: int, epoch: int) -> None:
    """Seed Python's and NumPy's global generators from ``(base_seed, epoch)``.

    Loaders shuffle and augment with these generators (in a prefetch thread or worker processes
    seeded from them), so seeding them at every epoch start makes each epoch's data depend only
    on the seed and the epoch number: the basis of exact mid-epoch resume.
    """
    seed = (base_seed * 1_000_003 + epoch) % 2**32
    random.seed(seed)
    np.random.seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and Paddle's generators (CPU and, if present, GPU)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "paddle": paddle.get_rng_state()}
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        state["paddle_cuda"] = paddle.get_cuda_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the states captured by :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.set_rng_state(state["paddle"])
    if "paddle_cuda" in state and paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        paddle.set_cuda_rng_state(state["paddle_cuda"])


def restore_paddle_rng_state(state: dict[str, Any]) -> None:
    """Put back only Paddle's generators (dropout and other in-model randomness)."""
    paddle.set_rng_state(state["paddle"])
    if "paddle_cuda" in state and paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        paddle.set_cuda_rng_state(state["paddle_cuda"])
