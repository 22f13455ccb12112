"""Per-layer sensitivity: which quantized layers cost the model its accuracy.

``sensitivity(model, loader)`` measures a metric (top-1 accuracy by default) on the same evaluation
batches under several quantization settings:

* all layers float (``float_metric``) and all layers quantized (``quantized_metric``);
* for each quantized layer, **only this layer** quantized (all others float) -- the damage the
  layer does by itself -- and **all but this layer** quantized -- what leaving it in float
  (``skip_patterns``) would win back.

A layer "in float" computes its float ``Conv2D``/``Linear`` on its raw input with its raw weight
(no activation or weight preprocess such as PACT, no quantizer), as it would if it were skipped; a
residual block whose identity input its consumer convolution quantizes
(``qtrainer.quant.transforms.residual``) then adds the raw identity too.

Rows are sorted most sensitive first: by ``gain_all_but_this`` (the largest recovery when the layer
alone stays float), ties broken by ``drop_only_this``. ``report.write(dir)`` writes
``sensitivity.csv``, ``sensitivity.json`` and the bar chart ``sensitivity.png``.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Callable, Iterable

import numpy as np
from paddle import nn

from qtrainer._checks import check_positive_int
from qtrainer.quant.diagnostics.layer_ranking import (
    COLUMNS,
    MODES,
    LayerSensitivity,
    SensitivityReport,
    metric_value,
    rank_layers,
    read_eval_batches,
    top1_accuracy,
)
from qtrainer.quant.methods.ptq import PTQ, calibrate, freeze, unfrozen_layers
from qtrainer.quant.transforms.wrap import iter_quanted_layers

__all__ = ["LayerSensitivity", "SensitivityReport", "sensitivity", "top1_accuracy", "read_eval_batches", "metric_value",
           "METHODS", "MODES", "COLUMNS"]

_log = logging.getLogger(__name__)

METHODS = ("ptq", "qat-state")


# ---------------------------------------------------------------------- inputs


def _check_arguments(model: Any, loader: Any, metric: Any, method: Any, mode: Any, calib_batches: Any,
                     eval_batches: Any, logger: Any) -> None:
    if not isinstance(model, nn.Layer):
        raise TypeError(f"sensitivity: model must be a paddle.nn.Layer, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"sensitivity: unknown method {method!r}; use one of {list(METHODS)}")
    if mode not in MODES:
        raise ValueError(
            f"sensitivity: mode={mode!r} is not valid; use 'max' (higher metric is better, e.g. accuracy) "
            "or 'min' (lower is better, e.g. a loss)"
        )
    if metric is not None and not callable(metric):
        raise TypeError(
            f"sensitivity: metric must be a callable metric(outputs, labels) -> float, got {type(metric).__name__}"
        )
    if metric is None and mode == "min":
        raise ValueError(
            "sensitivity: mode='min' needs a metric (the default top-1 accuracy is higher-is-better); "
            "pass metric=... or use mode='max'"
        )
    check_positive_int("calib_batches", calib_batches, owner="sensitivity")
    check_positive_int("eval_batches", eval_batches, allow_none=True, owner="sensitivity")
    if loader is None or not hasattr(loader, "__iter__"):
        raise TypeError(
            f"sensitivity: loader must be an iterable of (images, labels) batches (a paddle.io.DataLoader "
            f"or a list of tuples), got {type(loader).__name__}"
        )
    if iter(loader) is loader:
        raise TypeError(
            f"sensitivity: loader must be re-iterable (a paddle.io.DataLoader or a list of batches), got "
            f"the one-shot iterator {type(loader).__name__}: it is read several times"
        )
    if logger is not None and not callable(getattr(logger, "log_metrics", None)):
        raise TypeError(
            f"sensitivity: logger must have a log_metrics(metrics, step) method (a qtrainer logger), got "
            f"{type(logger).__name__}"
        )


def _prepare_ptq(model: nn.Layer, loader: Iterable, config: Any, calib_batches: int, fuse: bool) -> nn.Layer:
    quanted = [name or type(model).__name__ for name, _ in iter_quanted_layers(model)]
    if quanted:
        raise ValueError(
            f"sensitivity(method='ptq'): {type(model).__name__} is already quantized (quantized layers: "
            f"{', '.join(quanted[:5])}{', ...' if len(quanted) > 5 else ''}); give the float model, or use "
            "method='qat-state' to measure this model's quantization as it is"
        )
    if config is None:
        ptq = PTQ()
    elif isinstance(config, PTQ):
        ptq = config
    elif isinstance(config, dict):
        ptq = PTQ(**config)
    else:
        raise TypeError(
            f"sensitivity: config must be None, a dict of PTQ arguments (e.g. "
            f"{{'activation_quantizer': 'KLQuantizer'}}) or a PTQ object, got {type(config).__name__}"
        )
    try:
        work = ptq.quantize(model, fuse=fuse)  # a deep copy
    except ValueError as err:
        raise ValueError(f"sensitivity(method='ptq'): {err}") from None
    calibrate(work, loader, num_batches=calib_batches)
    return freeze(work)


def _prepare_state(model: nn.Layer, config: Any) -> nn.Layer:
    if config is not None:
        raise ValueError(
            "sensitivity(method='qat-state'): config applies to method='ptq' only; the model's own "
            "quantization state is measured as it is"
        )
    if next(iter_quanted_layers(model), None) is None:
        raise ValueError(
            f"sensitivity(method='qat-state'): {type(model).__name__} has no quantized layer; use "
            "method='ptq' for a float model, or quantize it first (QAT(...).quantize(model))"
        )
    waiting = unfrozen_layers(model)
    if waiting:
        raise ValueError(
            f"sensitivity(method='qat-state'): PTQ layers {waiting[:5]} are still calibrating; freeze the "
            "model first (qtrainer.quant.freeze(model))"
        )
    return copy.deepcopy(model)


# ---------------------------------------------------------------------- measuring


def sensitivity(
    model: nn.Layer,
    loader: Iterable,
    metric: Callable[[np.ndarray, np.ndarray], float] | None = None,
    method: str = "ptq",
    config: PTQ | dict[str, Any] | None = None,
    calib_batches: int = 8,
    eval_batches: int | None = None,
    output_dir: str | os.PathLike | None = None,
    logger: Any = None,
    *,
    mode: str = "max",
    fuse: bool = True,
) -> SensitivityReport:
    """Measure how much each quantized layer costs the metric; return a ``SensitivityReport``.

    Args:
        model: ``method='ptq'``: the float model (a deep copy is quantized with ``PTQ``);
            ``method='qat-state'``: a model that already holds quantized layers (after QAT, or a
            frozen PTQ model), measured with its state as it is. ``model`` itself is never changed.
        loader: ``(images, labels)`` batches, re-iterable (a ``paddle.io.DataLoader`` or a list of
            tuples of arrays/Tensors). The first ``eval_batches`` (None = all) are read once, kept
            in memory and used for every measurement; PTQ calibrates on its first ``calib_batches``.
        metric: ``metric(outputs, labels) -> float`` on the concatenated outputs (NumPy logits,
            ``[N, ...]``) and labels (NumPy) of all evaluation batches; default top-1 accuracy.
        method: ``'ptq'`` or ``'qat-state'``.
        config: ``method='ptq'`` only: ``PTQ`` arguments as a dict (e.g.
            ``{'activation_quantizer': 'KLQuantizer', 'weight_quantizer': 'AbsmaxQuantizer',
            'skip_patterns': [...]}``) or a ``PTQ`` object; None = ``PTQ()``'s defaults.
        calib_batches: number of calibration batches (``method='ptq'``).
        eval_batches: number of evaluation batches (None = the whole loader).
        output_dir: write ``sensitivity.csv``, ``sensitivity.json``, ``sensitivity.png`` there.
        logger: a qtrainer logger: ``log_metrics`` receives ``report.scalars()`` at step 0.
        mode: ``'max'`` (default: higher is better, an accuracy) or ``'min'`` (a loss).
        fuse: ``method='ptq'``: fold Conv2D + BatchNorm pairs first, as ``PTQCallback`` does.

    Cost: ``2 * layers + 2`` evaluation passes over the ``eval_batches`` (plus calibration with
    ``'ptq'``); the output SQNR is measured on the first evaluation batch, without extra passes.

    Raises:
        ValueError: an unknown ``method``/``mode``, ``calib_batches``/``eval_batches`` not a positive
            int, an empty loader, a metric returning something other than a finite number, a model
            with nothing to quantize (``'ptq'``) or no quantized layer (``'qat-state'``), a quantized
            model given to ``'ptq'``.
        TypeError: a model/loader/metric/config/logger of the wrong kind.
    """
    _check_arguments(model, loader, metric, method, mode, calib_batches, eval_batches, logger)
    batches = read_eval_batches(loader, eval_batches)
    if method == "ptq":
        work = _prepare_ptq(model, loader, config, calib_batches, fuse)
    else:
        work = _prepare_state(model, config)
    work.eval()
    report = rank_layers(work, batches, metric, mode, method, calib_batches if method == "ptq" else None)
    metric_name, float_metric, quantized_metric = report.metric_name, report.float_metric, report.quantized_metric
    _log.info("sensitivity: %s float %.4g, quantized %.4g; most sensitive: %s", metric_name, float_metric,
              quantized_metric, ", ".join(f"{r.name} (+{r.gain_all_but_this:.3g})" for r in report.layers[:3]))
    if output_dir is not None:
        report.write(output_dir)
    if logger is not None:
        logger.log_metrics(report.scalars(), step=0)
    return report

