"""An export's inputs: sample batches from a loader (shared by the callbacks) and the ``InputSpec``.

``spread_inputs`` is the self-check's default: samples drawn evenly across the whole loader, so
that a validation set stored class by class (an image folder) is checked on every class, not on
the first batches only. ``first_inputs`` takes the first batches (cheap; for reports that only
need a few inputs). ``normalise_spec``, ``check_batches_match`` and ``dry_run`` check the
``input_spec`` against the samples and the model before any export work.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

import numpy as np
import paddle
from paddle import nn

from qtrainer.data.iteration import close_iterator, guard_iterator

__all__ = ["first_inputs", "spread_inputs", "input_spec_for", "normalise_spec", "check_batches_match", "dry_run",
           "spec_dict", "spec_shapes"]

logger = logging.getLogger(__name__)


def _model_input(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def first_inputs(loader: Iterable | None, max_batches: int) -> list[np.ndarray]:
    """The model inputs (first element of each batch) of up to ``max_batches`` batches, as numpy."""
    if loader is None or max_batches <= 0:
        return []
    return _inputs_at(loader, set(range(max_batches)))


def _inputs_at(loader: Iterable, positions: set[int]) -> list[np.ndarray]:
    """The model inputs of the batches at ``positions`` (iterating ``loader``, stopping after the last)."""
    samples: list[np.ndarray] = []
    iterator = guard_iterator(iter(loader))
    try:
        for position, batch in enumerate(iterator):
            if position in positions:
                samples.append(_as_numpy(_model_input(batch)))
                if len(samples) == len(positions):
                    break
    finally:
        close_iterator(iterator)
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
    return _inputs_at(loader, set(np.linspace(0, length - 1, max_batches).round().astype("int64").tolist()))


def _as_numpy(value: Any) -> np.ndarray:
    return value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)


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


def normalise_spec(input_spec: Sequence[Any] | None, batches) -> list[paddle.static.InputSpec]:
    """``input_spec`` as a list of ``InputSpec`` (default: from the first sample batch, batch dim free)."""
    if input_spec is None:
        if not batches:
            raise ValueError("export_quantized_model needs input_spec or sample_inputs")
        return [
            paddle.static.InputSpec([None, *a.shape[1:]], dtype=str(a.dtype), name=f"x{i}" if i else "x")
            for i, a in enumerate(batches[0])
        ]
    if isinstance(input_spec, paddle.static.InputSpec) or not isinstance(input_spec, (list, tuple)):
        raise TypeError(
            f"input_spec must be a list of paddle.static.InputSpec (one per model input), got "
            f"{type(input_spec).__name__}"
        )
    specs = []
    for index, item in enumerate(input_spec):
        if isinstance(item, paddle.static.InputSpec):
            specs.append(item)
        elif isinstance(item, paddle.Tensor):
            specs.append(paddle.static.InputSpec.from_tensor(item))
        else:
            raise TypeError(
                f"input_spec[{index}] is a {type(item).__name__}; use paddle.static.InputSpec"
            )
    return specs


def _spec_text(spec: Sequence[Any]) -> str:
    return "[" + ", ".join(f"InputSpec(shape={list(s.shape)}, dtype={s.dtype})" for s in spec) + "]"


def dry_run(work: nn.Layer, spec: Sequence[Any]) -> None:
    """Run the copy once on zeros shaped by the spec; a failure names the spec."""
    zeros = [paddle.zeros(shape, dtype=dtype) for shape, dtype in spec_shapes(spec, 1)]
    try:
        with paddle.no_grad():
            work(*zeros)
    except Exception as err:
        raise ValueError(
            f"input_spec {_spec_text(spec)} does not match {type(work).__name__}: its forward on "
            f"zeros of that shape failed with {type(err).__name__}: {err}"
        ) from err


def check_batches_match(batches, spec) -> None:
    """``ValueError`` naming the first sample batch whose inputs do not fit ``spec``."""
    for index, batch in enumerate(batches):
        if len(batch) != len(spec):
            raise ValueError(
                f"sample batch {index} has {len(batch)} input(s), input_spec "
                f"{_spec_text(spec)} has {len(spec)}"
            )
        for array, s in zip(batch, spec):
            dims = list(s.shape)
            ok = array.ndim == len(dims) and all(
                d is None or d < 0 or d == n for d, n in zip(dims, array.shape)
            )
            if not ok:
                raise ValueError(
                    f"sample batch {index} has shape {list(array.shape)}, which does not match "
                    f"input_spec {_spec_text(spec)}"
                )


def spec_dict(spec) -> dict[str, Any]:
    """An ``InputSpec`` as plain JSON data."""
    return {"name": spec.name, "shape": list(spec.shape), "dtype": str(spec.dtype).replace("paddle.", "")}


def spec_shapes(input_spec: Sequence[Any], batch: int) -> list[tuple[list[int], str]]:
    """``[(shape with unknown dims set to batch, numpy dtype name)]`` for each ``InputSpec``."""
    out = []
    for spec in input_spec:
        shape = [batch if (d is None or d < 0) else int(d) for d in spec.shape]
        dtype = str(spec.dtype).replace("paddle.", "")
        out.append((shape, dtype))
    return out
