"""Sample inputs for an export's self-check, taken from a loader (shared by the callbacks).

``spread_inputs`` is the self-check's default: samples drawn evenly across the whole loader, so
that a validation set stored class by class (an image folder) is checked on every class, not on
the first batches only. ``first_inputs`` takes the first batches (cheap; for reports that only
need a few inputs).
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import numpy as np
import paddle

__all__ = ["first_inputs", "spread_inputs", "input_spec_for"]

logger = logging.getLogger(__name__)


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
            samples.append(_as_numpy(_model_input(batch)))
            if len(samples) >= max_batches:
                break
    finally:
        _shutdown(iterator)
    return samples


def spread_inputs(loader: Iterable | None, max_batches: int) -> list[np.ndarray]:
    """Model inputs of about ``max_batches`` batches, drawn evenly across ``loader``, as numpy.

    * A ``paddle.io.DataLoader`` over a map-style dataset: ``max_batches * batch_size`` samples at
      evenly spaced dataset indices (deterministic; the first and the last included), read with
      ``dataset[i]`` and batched by ``batch_size``. Only those samples are loaded.
    * Any other iterable with a length: the batches at evenly spaced positions (iterating it).
    * An iterable without a length: its first ``max_batches`` batches.
    """
    if loader is None or max_batches <= 0:
        return []
    dataset = getattr(loader, "dataset", None)
    batch_size = _batch_size(loader)
    if batch_size and _is_map_dataset(dataset):
        total = len(dataset)
        if total == 0:
            return []
        count = min(total, max_batches * batch_size)
        indices = np.unique(np.linspace(0, total - 1, count).round().astype("int64"))
        samples = []
        for start in range(0, len(indices), batch_size):
            items = [_model_input(dataset[int(i)]) for i in indices[start:start + batch_size]]
            samples.append(np.stack([_as_numpy(item) for item in items]))
        return samples
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        logger.info("self-check samples: the loader has no length; using its first %d batches", max_batches)
        return first_inputs(loader, max_batches)
    if length <= max_batches:
        return first_inputs(loader, max_batches)
    wanted = set(np.linspace(0, length - 1, max_batches).round().astype("int64").tolist())
    samples = []
    iterator = iter(loader)
    try:
        for position, batch in enumerate(iterator):
            if position in wanted:
                samples.append(_as_numpy(_model_input(batch)))
                if len(samples) == len(wanted):
                    break
    finally:
        _shutdown(iterator)
    return samples


def _as_numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


def _shutdown(iterator: Any) -> None:
    shutdown = getattr(iterator, "_try_shutdown_all", None)
    if shutdown is not None:
        shutdown()


def _batch_size(loader: Any) -> int | None:
    sampler = getattr(loader, "batch_sampler", None)
    size = getattr(sampler, "batch_size", None) or getattr(loader, "batch_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def _is_map_dataset(dataset: Any) -> bool:
    if dataset is None or isinstance(dataset, paddle.io.IterableDataset):
        return False
    return hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")


def input_spec_for(sample: np.ndarray) -> list[paddle.static.InputSpec]:
    """An ``InputSpec`` with a free batch dimension matching ``sample``."""
    return [paddle.static.InputSpec(shape=[None, *sample.shape[1:]], dtype=str(sample.dtype), name="x")]
