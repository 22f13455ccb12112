"""What the module logs with ``self.log``: per-step values and exact epoch reductions.

Epoch values are kept as sums and counts (or running max/min), so a distributed run can reduce
them exactly across ranks before computing the mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import paddle

__all__ = ["LoggedResults", "to_float"]

REDUCE_FXS = ("mean", "sum", "max", "min")


def to_float(value: Any, name: str) -> float:
    """Convert a scalar tensor, numpy scalar or number to ``float``; reject anything else."""
    if isinstance(value, paddle.Tensor):
        if math.prod(value.shape) != 1:
            raise ValueError(f"self.log({name!r}, ...) needs a scalar, got a value of shape {list(value.shape)}")
        return float(value.item())  # one copy to the host; right for bfloat16 too, unlike .numpy()
    if hasattr(value, "numpy"):
        array = np.asarray(value.numpy())
    else:
        array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"self.log({name!r}, {value!r:.60}): a metric must be a number: an int, a float, a bool, a numpy "
            f"scalar or a one-element paddle.Tensor, got {type(value).__name__}"
            + (" (log text with a logger's own API instead)" if isinstance(value, (str, bytes)) else "")
        )
    if array.size != 1:
        raise ValueError(f"self.log({name!r}, ...) needs a scalar, got a value of shape {list(array.shape)}")
    return float(array.reshape(()))


@dataclass
class _Entry:
    on_step: bool
    on_epoch: bool
    prog_bar: bool
    logger: bool
    reduce_fx: str
    last: float = math.nan
    total: float = 0.0
    weight: float = 0.0
    extreme: float = math.nan

    def add(self, value: float, weight: float) -> None:
        self.last = value
        self.total += value * weight
        self.weight += weight
        if self.reduce_fx == "max":
            self.extreme = value if math.isnan(self.extreme) else max(self.extreme, value)
        elif self.reduce_fx == "min":
            self.extreme = value if math.isnan(self.extreme) else min(self.extreme, value)


@dataclass
class LoggedResults:
    """The metrics of one stage's current epoch (``train``, ``validation``, ``test``)."""

    entries: dict[str, _Entry] = field(default_factory=dict)

    def log(
        self, name: str, value: float, *, weight: float, on_step: bool, on_epoch: bool,
        prog_bar: bool, logger: bool, reduce_fx: str,
    ) -> None:
        if reduce_fx not in REDUCE_FXS:
            raise ValueError(f"self.log({name!r}, reduce_fx={reduce_fx!r}): use one of {', '.join(REDUCE_FXS)}")
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = _Entry(on_step, on_epoch, prog_bar, logger, reduce_fx)
        entry.add(value, weight)

    def step_values(self) -> dict[str, tuple[float, _Entry]]:
        """The latest value of each per-step metric, under its logged name."""
        out = {}
        for name, entry in self.entries.items():
            if entry.on_step:
                out[f"{name}_step" if entry.on_epoch else name] = (entry.last, entry)
        return out

    def epoch_values(self, all_reduce: Callable[[np.ndarray, str], np.ndarray] | None = None) -> dict[str, tuple[float, _Entry]]:
        """The epoch reduction of each per-epoch metric; ``all_reduce(array, op)`` reduces across ranks."""
        out = {}
        for name, entry in self.entries.items():
            if not entry.on_epoch:
                continue
            if entry.reduce_fx in ("max", "min"):
                value = np.array([entry.extreme], dtype=np.float64)
                if all_reduce is not None:
                    value = all_reduce(value, entry.reduce_fx)
                result = float(value[0])
            else:
                sums = np.array([entry.total, entry.weight], dtype=np.float64)
                if all_reduce is not None:
                    sums = all_reduce(sums, "sum")
                result = float(sums[0]) if entry.reduce_fx == "sum" else float(sums[0] / max(sums[1], 1e-12))
            out[f"{name}_epoch" if entry.on_step else name] = (result, entry)
        return out

    def reset(self) -> None:
        self.entries.clear()

    def state_dict(self) -> dict[str, Any]:
        return {name: vars(entry).copy() for name, entry in self.entries.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = {name: _Entry(**values) for name, values in state.items()}
