"""Sample inputs for an export's self-check, taken from a loader (shared by the callbacks)."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import paddle

__all__ = ["first_inputs", "input_spec_for"]


def _model_input(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def first_inputs(loader: Iterable | None, max_batches: int) -> list[np.ndarray]:
    """The model inputs (first element of each batch) of up to ``max_batches`` batches, as numpy."""
    samples: list[np.ndarray] = []
    if loader is None or max_batches <= 0:
        return samples
    iterator = iter(loader)
    try:
        for batch in iterator:
            inputs = _model_input(batch)
            samples.append(inputs.numpy() if isinstance(inputs, paddle.Tensor) else np.asarray(inputs))
            if len(samples) >= max_batches:
                break
    finally:
        shutdown = getattr(iterator, "_try_shutdown_all", None)
        if shutdown is not None:
            shutdown()
    return samples


def input_spec_for(sample: np.ndarray) -> list[paddle.static.InputSpec]:
    """An ``InputSpec`` with a free batch dimension matching ``sample``."""
    return [paddle.static.InputSpec(shape=[None, *sample.shape[1:]], dtype=str(sample.dtype), name="x")]
