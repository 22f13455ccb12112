"""qtrainer/_checks.py: the one positive-integer check."""
from __future__ import annotations

import pytest

from qtrainer._checks import check_positive_int


def test_a_positive_int_passes_through():
    assert check_positive_int("batch_size", 3) == 3
    assert check_positive_int("max_steps", None, allow_none=True) is None


@pytest.mark.parametrize("value", [0, -1, 2.0, "3", True, None])
def test_anything_else_is_refused_naming_the_value(value):
    with pytest.raises(ValueError, match=rf"^batch_size={value!r}: use a positive integer$".replace("(", r"\(")):
        check_positive_int("batch_size", value)


def test_the_message_says_none_owner_and_hint():
    with pytest.raises(ValueError, match=r"^Trainer\(max_steps=0\): use a positive integer or None \(steps\)$"):
        check_positive_int("max_steps", 0, allow_none=True, hint=" (steps)", owner="Trainer")
