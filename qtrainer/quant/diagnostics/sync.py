"""Quantization state that is identical on every data-parallel rank.

``paddle.DataParallel`` averages gradients, so weights and learned parameters stay identical on
every rank; observers, however, update their buffers from each rank's own batch during the
forward pass, and PACT's ``alpha`` follows its rank's data during the warm-up. Left alone, each
rank trains against different quantizers and only rank 0's are exported. Two tools fix that,
both working through a reduction function the caller provides (the engine knows nothing of the
Trainer; ``qtrainer.strategy`` supplies ``all_gather``/``all_reduce``):

* :class:`QuantStateSync` -- during QAT, called after every training forward (``QATCallback``
  does it in ``on_train_batch_end``): one ``all_gather`` of every scale statistic, then each
  rank sets the same reduced value, and reports how far apart the ranks were before
  (``spread``: max minus min across ranks, in scale units).
* :func:`reduce_calibration_stats` -- once after PTQ calibration: combines every rank's
  statistics (abs max, moving averages, histograms) so that each rank holds those of the whole
  data set; two ranks calibrating halves give exactly the thresholds of one rank calibrating all.

How scales combine (``mode``):

* ``"auto"`` (default) -- what each observer's ``sync_modes()`` says: ``max`` for abs-max
  buffers, ``mean`` for moving averages (``accum``/``state``) and PACT ``alpha``.
* ``"max"`` -- every scale statistic is max-reduced. For a moving average this is exactly the
  single-process run on the global batch: the ranks share ``rate * accum`` and differ only by
  their batch's abs max, and the global batch's abs max is the largest of those.
* ``"mean"`` -- every scale statistic is averaged (abs-max scales become the mean of the ranks'
  batch maxima: smoother, closer to what one rank with its local batch size would see).

The scale statistics are the buffers named ``absmax``, ``accum`` and PACT's ``alpha``; counters
(``state``, ``warmup_count``, ``seen``) always use their observer's mode.
Weight observers that recompute the scale from the weight at every forward (the built-in
abs-max / channel-wise weight quanters) are skipped: their weights are already identical.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import paddle
from paddle import nn

from qtrainer.quant.base import Quanter
from qtrainer.quant.transforms.wrap import iter_quanted_layers, quant_sync_modes

__all__ = ["SYNC_MODES", "QuantStateSync", "reduce_calibration_stats", "scale_spread_metrics"]

log = logging.getLogger(__name__)

SYNC_MODES = ("auto", "mean", "max")
_SCALE_BUFFERS = frozenset({"absmax", "accum", "alpha"})


def _weight_derived_prefixes(model: nn.Layer) -> tuple[str, ...]:
    """State-key prefixes of weight quanters whose scale is recomputed from the weight every forward."""
    prefixes = []
    for name, layer in iter_quanted_layers(model):
        quanter = layer.weight_quanter
        if isinstance(quanter, Quanter) and quanter.follows_input:
            prefixes.append(f"{name}.weight_quanter." if name else "weight_quanter.")
    return tuple(prefixes)


class QuantStateSync:
    """Make a quantized model's observer state identical on every rank, after each update.

    Args:
        model: the quantized model (the same structure on every rank).
        all_gather: ``all_gather(array) -> array[world_size, ...]`` of a float64 vector
            (``trainer.strategy.all_gather``).
        mode: ``"auto"``, ``"mean"`` or ``"max"`` (see the module docstring).
        include_weight_observers: also reduce weight quanters whose scale follows the weight
            (identical already under DataParallel; only useful to check that).

    Calling the object reduces every listed buffer in one collective and returns the
    pre-reduction spread of each scale across ranks (``{name: max - min}``, names as in the
    ``state_dict`` with a moving average's ``accum`` reported as its ``scale``).
    """

    def __init__(self, model: nn.Layer, all_gather: Callable[[np.ndarray], np.ndarray], mode: str = "auto",
                 include_weight_observers: bool = False) -> None:
        if mode not in SYNC_MODES:
            raise ValueError(f"QuantStateSync(mode={mode!r}): use one of {', '.join(SYNC_MODES)}")
        if not callable(all_gather):
            raise TypeError(f"all_gather must be callable (e.g. trainer.strategy.all_gather), got {all_gather!r}")
        self.mode = mode
        self._all_gather = all_gather
        modes = quant_sync_modes(model)
        summed = sorted(k for k, m in modes.items() if m not in ("max", "mean", "min"))
        if summed:
            raise ValueError(
                f"{len(summed)} state entries are combined by {modes[summed[0]]!r} (calibration histograms such as "
                f"{summed[0]}); reduce them once after calibration with reduce_calibration_stats, not at every step")
        skip = () if include_weight_observers else _weight_derived_prefixes(model)
        state = model.state_dict()
        self._entries: list[tuple[str, paddle.Tensor, str, slice]] = []
        self._dtypes: list[np.dtype] = []
        offset = 0
        for key in sorted(modes):
            if key.startswith(skip) or key not in state:
                continue
            tensor = state[key]
            op = mode if mode != "auto" and key.rsplit(".", 1)[-1] in _SCALE_BUFFERS else modes[key]
            size = int(np.prod(tensor.shape)) if tensor.shape else 1
            self._entries.append((key, tensor, op, slice(offset, offset + size)))
            self._dtypes.append(np.dtype(tensor.numpy().dtype))
            offset += size
        self._size = offset
        self._max_mask = np.zeros(offset, dtype=bool)
        self._min_mask = np.zeros(offset, dtype=bool)
        for _, _, op, where in self._entries:
            self._max_mask[where] = op == "max"
            self._min_mask[where] = op == "min"
        self._scale_entries = [(key, where) for key, _, _, where in self._entries
                               if key.rsplit(".", 1)[-1] in _SCALE_BUFFERS]
        self._state_of = {key: self._slice_of(key[: -len("accum")] + "state") for key, _ in self._scale_entries
                          if key.endswith(".accum") or key == "accum"}
        log.debug("QuantStateSync: %d buffers (%d values), mode %s", len(self._entries), offset, mode)

    def _slice_of(self, key: str) -> slice | None:
        for name, _, _, where in self._entries:
            if name == key:
                return where
        return None

    @property
    def keys(self) -> list[str]:
        """The state-dict keys this object reduces."""
        return [key for key, _, _, _ in self._entries]

    def local_values(self) -> np.ndarray:
        """This rank's values of every listed buffer, as one float64 vector (what ``all_gather`` receives)."""
        if not self._entries:
            return np.zeros(0, dtype=np.float64)
        return np.concatenate([np.asarray(t.numpy(), dtype=np.float64).reshape(-1) for _, t, _, _ in self._entries])

    def __call__(self) -> dict[str, float]:
        if not self._entries:
            return {}
        local = self.local_values()
        gathered = np.asarray(self._all_gather(local), dtype=np.float64).reshape(-1, self._size)
        high, low = gathered.max(axis=0), gathered.min(axis=0)
        reduced = np.where(self._max_mask, high, np.where(self._min_mask, low, gathered.mean(axis=0)))
        for (_, tensor, _, where), dtype in zip(self._entries, self._dtypes):
            new = reduced[where]
            if not np.array_equal(new, local[where]):
                tensor.set_value(new.reshape(tensor.shape).astype(dtype))
        return self._spreads(high - low, reduced)

    def _spreads(self, spread: np.ndarray, reduced: np.ndarray) -> dict[str, float]:
        out = {}
        for key, where in self._scale_entries:
            value = float(spread[where].max())
            state = self._state_of.get(key)
            if state is not None:
                value /= max(float(reduced[state].max()), 1.0)
                key = key[: -len("accum")] + "scale"
            out[key] = value
        return out


def scale_spread_metrics(spreads: Mapping[str, float], prefix: str = "quant/scale_spread") -> dict[str, float]:
    """Logging names for the spreads a :class:`QuantStateSync` call returned, plus their maximum."""
    metrics = {f"{prefix}/{key}": value for key, value in spreads.items()}
    if spreads:
        metrics[f"{prefix}/max"] = max(spreads.values())
    return metrics


def _as_layer(stats: nn.Layer | Mapping[str, nn.Layer] | Iterable[nn.Layer]) -> nn.Layer:
    if isinstance(stats, nn.Layer):
        return stats
    if isinstance(stats, Mapping):
        return nn.LayerDict(dict(stats))
    return nn.LayerList(list(stats))


def reduce_calibration_stats(stats: nn.Layer | Mapping[str, nn.Layer] | Iterable[nn.Layer],
                             all_reduce: Callable[[np.ndarray, str], np.ndarray]) -> list[str]:
    """Combine every rank's calibration statistics in place; return the reduced state keys.

    ``stats`` is the calibrated model, or the calibrators themselves (a dict or list of
    layers); every rank must pass the same structure. ``all_reduce(array, op)`` reduces across
    ranks (``trainer.strategy.all_reduce``; ``op`` is ``"sum"``, ``"max"``, ``"min"`` or
    ``"mean"``). Histogram calibrators first agree on the largest range (each rank calls
    ``expand_range`` with it), then their counts are summed; abs maxima are max-reduced, moving
    averages averaged. Afterwards every rank computes the same thresholds: those of one process
    that calibrated on all the ranks' data. Call it on every rank after the last calibration batch.
    """
    layer = _as_layer(stats)
    modes = quant_sync_modes(layer)
    state = layer.state_dict()
    ranged = [(f"{name}.range_exp" if name else "range_exp", sub)
              for name, sub in layer.named_sublayers(include_self=True) if callable(getattr(sub, "expand_range", None))]
    ranged = [(key, sub) for key, sub in ranged if modes.get(key) == "max" and key in state]
    if ranged:
        local = np.array([int(state[key].numpy().reshape(-1)[0]) for key, _ in ranged], dtype=np.int64)
        agreed = np.asarray(all_reduce(local, "max")).astype(np.int64)
        for (_, sub), exp in zip(ranged, agreed):
            sub.expand_range(int(exp))
    done = {key for key, _ in ranged}
    groups: dict[tuple[str, str], list[str]] = {}
    for key in sorted(modes):
        if key in done or key not in state:
            continue
        groups.setdefault((modes[key], str(state[key].numpy().dtype)), []).append(key)
    for (op, _), keys in sorted(groups.items()):
        arrays = [state[key].numpy() for key in keys]
        dtype = np.float64 if op == "mean" else arrays[0].dtype
        flat = np.concatenate([a.reshape(-1).astype(dtype) for a in arrays])
        reduced = np.asarray(all_reduce(flat, op))
        offset = 0
        for key, array in zip(keys, arrays):
            part = reduced[offset:offset + array.size].reshape(array.shape).astype(array.dtype)
            offset += array.size
            state[key].set_value(part)
    return sorted(done | {k for keys in groups.values() for k in keys})
