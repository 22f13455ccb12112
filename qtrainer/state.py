"""``TrainerState``: a run's progress as plain data, the one object checkpoints, resume and spawned ranks use.

The Trainer's ``current_epoch``, ``global_step``, ``should_stop``, ``log_history``,
``callback_metrics``... are properties over ``trainer.state``. A checkpoint stores
:meth:`TrainerState.checkpoint_dict` (progress, history, metrics, data seed); a spawned rank 0 hands
:meth:`TrainerState.state_dict` (that plus the stop decision and the displayed and logged metrics)
back to the calling process. Best scores stay with the callbacks that keep them (``ModelCheckpoint``,
``EarlyStopping``), in their own checkpointed state.
"""
from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["TrainerState", "RUNNING_LOSS_WINDOW"]

RUNNING_LOSS_WINDOW = 20  # training losses averaged for the progress bar's "loss"

# What a checkpoint carries: a resumed run continues from exactly these.
_CHECKPOINTED = ("epoch", "global_step", "batches_done", "epoch_finished", "log_history", "callback_metrics",
                 "data_seed", "running_loss")
# Flags of the call in progress: never saved, never handed back.
_TRANSIENT = ("stage", "sanity_checking", "failed")


@dataclass
class TrainerState:
    """Where a run is. ``epoch`` counts finished epochs (the one in progress during training);
    ``batches_done`` the training batches of it done so far; ``epoch_finished`` is True while an
    epoch's end is being checkpointed (a resume then starts the next epoch)."""

    epoch: int = 0
    global_step: int = 0
    batches_done: int = 0
    epoch_finished: bool = False
    should_stop: bool = False
    data_seed: int = 0
    log_history: list[dict[str, float]] = field(default_factory=list)
    callback_metrics: dict[str, float] = field(default_factory=dict)
    progress_bar_metrics: dict[str, float] = field(default_factory=dict)
    logged_metrics: dict[str, float] = field(default_factory=dict)
    running_loss: deque = field(default_factory=lambda: deque(maxlen=RUNNING_LOSS_WINDOW))
    stage: str | None = None
    sanity_checking: bool = False
    failed: bool = False

    def state_dict(self) -> dict[str, Any]:
        """Every field but the flags of the call in progress, as plain Python data (copies)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name not in _TRANSIENT}

    def checkpoint_dict(self) -> dict[str, Any]:
        """The fields a checkpoint stores (``state_dict`` without the stop decision and display metrics)."""
        return {name: _plain(getattr(self, name)) for name in _CHECKPOINTED}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the fields present in ``state`` (from either dict above; unknown keys raise ``KeyError``)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(state) - names)
        if unknown:
            raise KeyError(f"TrainerState.load_state_dict: unknown fields {unknown}; known: {sorted(names)}")
        for name, value in state.items():
            if name == "running_loss":
                value = deque(value, maxlen=RUNNING_LOSS_WINDOW)
            setattr(self, name, copy.deepcopy(value))

    def record(self, metrics: dict[str, float]) -> None:
        """Add ``metrics`` to ``log_history``: merged into the last row when it is of this epoch and step."""
        last = self.log_history[-1] if self.log_history else None
        if last is not None and last["step"] == self.global_step and last["epoch"] == self.epoch:
            last.update(metrics)
        else:
            self.log_history.append({"epoch": self.epoch, "step": self.global_step, **metrics})


def _plain(value: Any) -> Any:
    if isinstance(value, deque):
        return list(value)
    return copy.deepcopy(value)


class StateField:
    """A Trainer attribute that reads and writes ``trainer.state.<name>`` (``trainer.global_step``...)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, trainer: Any, owner: type | None = None) -> Any:
        if trainer is None:
            return self
        return getattr(trainer.state, self.name)

    def __set__(self, trainer: Any, value: Any) -> None:
        setattr(trainer.state, self.name, value)
