"""Per-layer quantization statistics, as plain numbers for loggers.

``collect_quant_stats(model)`` returns, for every quanted layer (by its ``named_sublayers`` name),
a dict of plain Python floats / NumPy arrays:

* ``act_scale`` -- the activation threshold ``T`` (``None`` until something was observed, or when
  a user quanter has no ``scale()``); ``act_pact_alpha`` -- ``|alpha|`` with activation PACT.
* ``act_clip_fraction`` -- fraction of the last recorded input values beyond the threshold
  (``None`` unless recording was switched on with ``record_activation_clipping``, which costs two
  extra passes per quantized input, so a callback turns it on only for the steps it logs).
* ``weight_scale`` -- 1-D array of the weight thresholds (one per output channel when
  channel-wise; length 1 otherwise); ``weight_pact_alpha`` with weight PACT.
* ``weight_clip_fraction`` -- fraction of the float weight beyond its threshold (0 for abs-max
  weights without PACT: the threshold is the abs max).
* ``weight_sqnr_db`` -- ``10 log10(sum(w^2) / sum((w - q(w))^2))`` of the fake-quantized weight
  ``q(w)`` against the float weight ``w`` (``inf`` if they are equal).
* ``act_bits``, ``weight_bits``, ``layer_type``.

``flatten_for_logging(stats)`` turns that into ``(scalars, histograms)`` keyed by tags
``quant/<stat>/<layer>`` (grouped by statistic, so TensorBoard shows each statistic as one section
across layers; ``stat_tag`` / ``split_stat_tag`` build and read them), plus ``quant/summary/...``
aggregates.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import paddle
from paddle import nn

from qtrainer.quant.quanters.fake_quant import FakeQuanter
from qtrainer.quant.quanters.pact import PACT
from qtrainer.quant.transforms.wrap import QuantedLayer, iter_quanted_layers

__all__ = ["SUMMARY", "collect_quant_stats", "flatten_for_logging", "record_activation_clipping", "split_stat_tag",
           "stat_tag"]

logger = logging.getLogger(__name__)

# Entries that describe the layer rather than measure it: not logged.
_DESCRIPTIVE_KEYS = ("layer_type", "act_bits", "weight_bits")
SUMMARY = "summary"  # the group of whole-model aggregates: ``<prefix>/summary/<aggregate>``


def stat_tag(stat: str, layer: str, prefix: str = "quant") -> str:
    """The logging tag of one layer's statistic: ``<prefix>/<stat>/<layer>``."""
    return f"{prefix}/{stat}/{layer}"


def split_stat_tag(tag: str, prefix: str = "quant") -> tuple[str, str] | None:
    """``(stat, layer)`` of a ``stat_tag``; None for other tags (and for ``<prefix>/summary/...``)."""
    if not tag.startswith(f"{prefix}/"):
        return None
    stat, sep, layer = tag[len(prefix) + 1:].partition("/")
    if not sep or not stat or not layer or stat == SUMMARY:
        return None
    return stat, layer


def record_activation_clipping(model: nn.Layer, enabled: bool = True) -> int:
    """Switch clip-fraction recording of every activation quanter / PACT on or off.

    Returns the number of layers switched. While on, each forward stores the fraction of the
    input beyond the threshold; ``collect_quant_stats`` reports the last one.
    """
    count = 0
    for _, layer in iter_quanted_layers(model):
        for sub in (layer.act_preprocess, layer.act_quanter):
            if isinstance(sub, (FakeQuanter, PACT)) and sub.record_clipping != bool(enabled):
                sub.record_clipping = bool(enabled)
                count += 1
    return count


def _to_float(t: paddle.Tensor) -> float:
    return float(np.asarray(t.numpy(), dtype=np.float64).reshape(-1)[0])


def _act_scale(layer: QuantedLayer) -> float | None:
    quanter = layer.act_quanter
    if isinstance(quanter, FakeQuanter) and not quanter.is_ready():
        return None
    try:
        return _to_float(layer.act_scale())
    except TypeError:  # a user quanter without scale()
        return None


def _act_clip_fraction(layer: QuantedLayer) -> float | None:
    for sub in (layer.act_preprocess, layer.act_quanter):
        value = getattr(sub, "last_clip_fraction", None) if sub is not None else None
        if value is not None:
            return _to_float(value)
    return None


def _weight_stats(layer: QuantedLayer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with paddle.no_grad():
        w = layer.weight.detach()
        try:
            scale = layer.weight_scale()
        except TypeError:
            scale = None
        if scale is not None:
            out["weight_scale"] = np.asarray(scale.numpy(), dtype=np.float64).reshape(-1)
            t = scale
            axis = layer.weight_axis
            if axis is not None and t.shape[0] > 1:
                shape = [1] * w.ndim
                shape[axis] = -1
                t = t.reshape(shape)
            out["weight_clip_fraction"] = _to_float((w.abs() > t).astype("float32").mean())
        q = layer.quantized_weight()
        w64 = np.asarray(w.numpy(), dtype=np.float64)
        err = float(np.sum((w64 - np.asarray(q.numpy(), dtype=np.float64)) ** 2))
        signal = float(np.sum(w64**2))
        out["weight_sqnr_db"] = math.inf if err == 0.0 else 10.0 * math.log10(signal / err)
    if layer.weight_pact:
        out["weight_pact_alpha"] = _to_float(layer.weight_preprocess.threshold())
    return out


def collect_quant_stats(model: nn.Layer) -> dict[str, dict[str, Any]]:
    """Statistics of every quanted layer of ``model`` (see the module docstring)."""
    stats: dict[str, dict[str, Any]] = {}
    for name, layer in iter_quanted_layers(model):
        entry: dict[str, Any] = {
            "layer_type": layer.layer_type,
            "act_bits": layer.act_bits,
            "weight_bits": layer.weight_bits,
            "act_scale": _act_scale(layer),
            "act_clip_fraction": _act_clip_fraction(layer),
        }
        if isinstance(layer.act_preprocess, PACT):
            entry["act_pact_alpha"] = _to_float(layer.act_preprocess.threshold())
        entry.update(_weight_stats(layer))
        stats[name or type(model).__name__] = entry
    return stats


def flatten_for_logging(
    stats: dict[str, dict[str, Any]], prefix: str = "quant"
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``(scalars, histograms)`` with tags ``<prefix>/<stat>/<layer>`` (``stat_tag``).

    Numbers become scalars (``None`` entries and the descriptive ``layer_type`` / ``*_bits`` are
    left out); arrays with more than one value
    become histograms, one-value arrays scalars. Aggregates go under ``<prefix>/summary/``:
    ``min_weight_sqnr_db``, ``mean_weight_sqnr_db`` (finite values only) and
    ``mean_act_clip_fraction`` (when recorded).
    """
    scalars: dict[str, float] = {}
    histograms: dict[str, np.ndarray] = {}
    sqnrs, clips = [], []
    for layer_name, entry in stats.items():
        for key, value in entry.items():
            tag = stat_tag(key, layer_name, prefix)
            if key in _DESCRIPTIVE_KEYS or value is None or isinstance(value, (str, bool)):
                continue
            if isinstance(value, np.ndarray):
                if value.size > 1:
                    histograms[tag] = value
                elif value.size == 1:
                    scalars[tag] = float(value.reshape(-1)[0])
            elif isinstance(value, (int, float)):
                scalars[tag] = float(value)
        sqnr = entry.get("weight_sqnr_db")
        if sqnr is not None and math.isfinite(sqnr):
            sqnrs.append(sqnr)
        if entry.get("act_clip_fraction") is not None:
            clips.append(entry["act_clip_fraction"])
    if sqnrs:
        scalars[f"{prefix}/{SUMMARY}/min_weight_sqnr_db"] = float(min(sqnrs))
        scalars[f"{prefix}/{SUMMARY}/mean_weight_sqnr_db"] = float(np.mean(sqnrs))
    if clips:
        scalars[f"{prefix}/{SUMMARY}/mean_act_clip_fraction"] = float(np.mean(clips))
    return scalars, histograms
