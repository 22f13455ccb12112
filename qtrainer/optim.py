"""Reading what ``configure_optimizers`` returns, and optimizer state that survives a new process."""
from __future__ import annotations

from typing import Any

import numpy as np
import paddle
from paddle.optimizer import Optimizer
from paddle.optimizer.lr import LRScheduler

from qtrainer._checks import check_positive_int

__all__ = ["parse_optimizers", "portable_optimizer_state", "load_portable_optimizer_state"]

_EXPECTED = (
    "an optimizer, (optimizer, lr_scheduler), [optimizers], ([optimizers], [lr_schedulers]), or "
    "{'optimizer': ..., 'lr_scheduler': LRScheduler or {'scheduler': ..., 'interval': 'step'|'epoch', 'frequency': n}}"
)


def _scheduler_config(item: Any) -> dict[str, Any]:
    if isinstance(item, LRScheduler):
        return {"scheduler": item, "interval": "epoch", "frequency": 1}
    if isinstance(item, dict) and isinstance(item.get("scheduler"), LRScheduler):
        unknown = set(item) - {"scheduler", "interval", "frequency", "name"}
        if unknown:
            raise ValueError(f"lr_scheduler dict has unknown keys {sorted(unknown)}; accepted: scheduler, interval, frequency, name")
        interval = item.get("interval", "epoch")
        if interval not in ("step", "epoch"):
            raise ValueError(f"lr_scheduler interval={interval!r}: use 'step' or 'epoch'")
        frequency = item.get("frequency", 1)
        check_positive_int("lr_scheduler frequency", frequency)
        return {"scheduler": item["scheduler"], "interval": interval, "frequency": frequency}
    raise TypeError(f"configure_optimizers returned a scheduler of type {type(item).__name__}; expected {_EXPECTED}")


def _is_scheduler_like(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_scheduler_like(v) for v in value)
    return isinstance(value, LRScheduler) or (isinstance(value, dict) and "scheduler" in value)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_optimizers(result: Any) -> tuple[list[Optimizer], list[dict[str, Any]]]:
    """Normalise the result of ``configure_optimizers`` into (optimizers, scheduler configs)."""
    if isinstance(result, dict):
        if "optimizer" not in result:
            raise TypeError(f"configure_optimizers returned a dict without 'optimizer'; expected {_EXPECTED}")
        optimizers = _as_list(result["optimizer"])
        schedulers = [] if result.get("lr_scheduler") is None else _as_list(result["lr_scheduler"])
    elif isinstance(result, (list, tuple)) and len(result) == 2 and _is_scheduler_like(result[1]):
        optimizers, schedulers = _as_list(result[0]), _as_list(result[1])
    elif result is None:
        optimizers, schedulers = [], []
    else:
        optimizers, schedulers = _as_list(result), []
    if not optimizers or not all(isinstance(o, Optimizer) for o in optimizers):
        got = type(result).__name__ if not optimizers else ", ".join(type(o).__name__ for o in optimizers)
        raise TypeError(f"configure_optimizers returned {got}; expected {_EXPECTED}")
    configs = [_scheduler_config(s) for s in schedulers if s is not None]
    for optimizer in optimizers:
        lr = optimizer._learning_rate
        if isinstance(lr, LRScheduler) and not any(c["scheduler"] is lr for c in configs):
            configs.append({"scheduler": lr, "interval": "epoch", "frequency": 1})
    return optimizers, configs


def _name_map(module: paddle.nn.Layer) -> dict[str, str]:
    """Paddle's per-process parameter names → stable structured names."""
    return {param.name: structured for structured, param in module.named_parameters()}


def _rename(key: str, mapping: dict[str, str]) -> str | None:
    best = None
    for old in mapping:
        if key == old or key.startswith(old + "_"):
            if best is None or len(old) > len(best):
                best = old
    return None if best is None else mapping[best] + key[len(best):]


def portable_optimizer_state(optimizer: Optimizer, module: paddle.nn.Layer) -> dict[str, Any]:
    """The optimizer's state with keys by structured parameter name and values as numpy."""
    mapping = _name_map(module)
    state: dict[str, Any] = {"accumulators": {}, "other": {}}
    for key, value in optimizer.state_dict().items():
        if isinstance(value, paddle.Tensor):
            renamed = _rename(key, mapping)
            target = state["accumulators"] if renamed is not None else state["other"]
            target[renamed if renamed is not None else key] = value.numpy()
        else:
            state["other"][key] = value
    return state


def load_portable_optimizer_state(optimizer: Optimizer, module: paddle.nn.Layer, state: dict[str, Any]) -> None:
    """Inverse of :func:`portable_optimizer_state` for the current process's parameter names."""
    reverse = {structured: name for name, structured in _name_map(module).items()}
    restored: dict[str, Any] = {}
    for key, value in state["accumulators"].items():
        renamed = _rename(key, reverse)
        if renamed is None:
            raise ValueError(f"optimizer state refers to parameter {key!r}, which the model does not have")
        restored[renamed] = paddle.to_tensor(np.asarray(value))
    for key, value in state["other"].items():
        restored[key] = paddle.to_tensor(value) if isinstance(value, np.ndarray) else value
    optimizer.set_state_dict(restored)
