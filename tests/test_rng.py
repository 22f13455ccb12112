"""qtrainer/rng.py: seeding, and capturing/restoring every generator a run uses."""
from __future__ import annotations

import random

import numpy as np
import paddle
import pytest

from qtrainer.rng import capture_rng_state, restore_paddle_rng_state, restore_rng_state, seed_data_rngs, seed_everything


def draws():
    return random.random(), float(np.random.rand()), float(paddle.rand([1]).numpy()[0])


def test_seed_everything_makes_every_generator_repeat():
    seed_everything(11)
    first = draws()
    seed_everything(11)
    assert draws() == first


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_a_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match=r"use an integer in \[0, 2\*\*32\)"):
        seed_everything(seed)


def test_data_rngs_depend_only_on_seed_and_epoch():
    seed_data_rngs(3, 1)
    first = (random.random(), float(np.random.rand()))
    random.random(), np.random.rand()
    seed_data_rngs(3, 1)
    assert (random.random(), float(np.random.rand())) == first
    seed_data_rngs(3, 2)
    assert (random.random(), float(np.random.rand())) != first


def test_captured_states_are_restored():
    seed_everything(5)
    state = capture_rng_state()
    expected = draws()
    restore_rng_state(state)
    assert draws() == expected
    restore_paddle_rng_state(state)  # only Paddle's generator goes back
    assert float(paddle.rand([1]).numpy()[0]) == expected[2]
