"""Argument checks shared across qtrainer (one implementation each)."""
from __future__ import annotations

from typing import Any

__all__ = ["check_positive_int", "check_limit_batches"]


def check_positive_int(name: str, value: Any, *, allow_none: bool = False, hint: str = "",
                       owner: str | None = None) -> Any:
    """Return ``value`` when it is an int >= 1 (or None with ``allow_none``), else raise ``ValueError``.

    The message names the argument, the bad value and what is accepted, e.g.
    ``"batch_size=0: use a positive integer"`` (``owner="Trainer"``: ``"Trainer(batch_size=0): ..."``);
    ``hint`` is appended (e.g. ``" (e.g. 224)"``).
    ``bool`` is refused although it is an ``int``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        where = f"{name}={value!r}" if owner is None else f"{owner}({name}={value!r})"
        raise ValueError(f"{where}: use a positive integer{' or None' if allow_none else ''}{hint}")
    return value


def check_limit_batches(name: str, value: Any) -> None:
    """A ``limit_*_batches`` value: None, an int >= 0 (batches) or a float fraction in [0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: use an int (number of batches) or a float fraction in [0, 1]")
    if isinstance(value, float) and not 0.0 <= value <= 1.0 or isinstance(value, int) and value < 0:
        raise ValueError(f"{name}={value!r}: use an int >= 0 (number of batches) or a float fraction in [0, 1]")
