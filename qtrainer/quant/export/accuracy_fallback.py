"""Accuracy-aware fallback: keep the most sensitive layers in float until the deployed model loses at most ``max_drop``.

``export_within_drop`` (behind ``export_quantized_model(..., max_drop=...)``) measures the metric
of the float model and of each deployed int8 export on ``eval_loader``; while the deployed model
loses more than ``max_drop`` (in the metric's units, e.g. 0.005 = 0.5 pt of top-1 accuracy),
it adds the next layer of the sensitivity ranking (``qtrainer.quant.diagnostics.layer_ranking``,
as ``sensitivity(method="qat-state")``: first the layer whose staying in float alone wins back the most) to ``keep_float`` and exports again. It stops when the drop is met or no int8 layer
is left, then writes the chosen export to ``path``. The report's ``accuracy`` records the float
and deployed metrics, each attempt (layers kept, metric, drop, int8 speed-up over float) and the
latency cost of the layers kept.

Cost: the sensitivity ranking (2 x layers + 2 dygraph passes over the eval batches), then one
export + one deployed pass per attempt, and the final export.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable

import numpy as np

from qtrainer.quant.diagnostics.layer_ranking import MODES, metric_value, rank_layers, read_eval_batches, top1_accuracy
from qtrainer.quant.export.files import check_export_target
from qtrainer.quant.export.inference import load_int8_predictor, predict, run_batches
from qtrainer.quant.export.plan import matches, working_copy

__all__ = ["export_within_drop", "check_max_drop"]

logger = logging.getLogger(__name__)


def check_max_drop(max_drop: Any, eval_loader: Any, metric: Any, mode: Any) -> None:
    """Raise ``ValueError``/``TypeError`` for a bad ``max_drop`` / ``eval_loader`` / ``metric`` / ``mode``."""
    if max_drop is None:
        if eval_loader is not None or metric is not None:
            raise ValueError("eval_loader and metric are used by the accuracy-aware fallback only: give max_drop too")
        return
    if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not math.isfinite(max_drop) or max_drop < 0:
        raise ValueError(
            f"max_drop={max_drop!r} must be a number >= 0: the largest loss of the metric (in its own units, "
            "e.g. 0.005 for half a point of top-1 accuracy) the deployed model may have against the float model"
        )
    if eval_loader is None:
        raise ValueError(
            "max_drop needs eval_loader: held-out (images, labels) batches on which the float and the deployed "
            "models are compared (a paddle.io.DataLoader or a list of batches)"
        )
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be a callable metric(logits, labels) -> float, got {type(metric).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not valid: use one of {MODES} ('max': higher is better)")


def _deployed_metric(prefix: str, batches, metric: Callable, name: str, threads: int) -> float:
    predictor, _ = load_int8_predictor(prefix, num_threads=threads)
    outputs = run_batches(lambda images: predict(predictor, images), ([images.numpy()] for images, _ in batches))
    labels = np.concatenate([np.asarray(labels) for _, labels in batches], axis=0)
    return metric_value(metric(outputs[0], labels), "on the deployed int8 model", name)


def export_within_drop(
    model,
    path: str,
    input_spec,
    sample_inputs,
    options,
    export: Callable[..., Any],
    *,
    max_drop: float,
    eval_loader: Iterable,
    metric: Callable | None = None,
    mode: str = "max",
    eval_batches: int | None = None,
):
    """Export ``model`` with the fewest float layers (in sensitivity order) whose deployed drop is <= ``max_drop``.

    ``export(model, prefix, input_spec, sample_inputs, options)`` is one export (the orchestration's);
    ``options`` its ``ExportOptions``. Returns the final ``ExportReport`` with ``accuracy`` filled in.
    """
    check_max_drop(max_drop, eval_loader, metric, mode)
    check_export_target(path, options.overwrite, options.run_id)  # a protected target fails before the work
    metric = metric or top1_accuracy
    name = getattr(metric, "__name__", type(metric).__name__)
    sign = 1.0 if mode == "max" else -1.0
    batches = read_eval_batches(eval_loader, eval_batches)
    ranked = rank_layers(working_copy(model), batches, metric, mode)
    ranking = [n for n in ranked.ranking() if not matches(n, options.keep_float)]
    float_metric = ranked.float_metric
    threads = options.check.num_threads
    attempts: list[dict[str, Any]] = []
    kept: list[str] = []
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    trials = tempfile.mkdtemp(prefix=".accuracy-fallback-", dir=parent)
    try:
        while True:
            trial = dataclasses.replace(
                options, keep_float=(*options.keep_float, *kept), overwrite=True, run_id=None,
                check=dataclasses.replace(options.check, on_failure="write"),
            )
            prefix = os.path.join(trials, f"attempt{len(attempts)}")
            report = export(model, prefix, input_spec, sample_inputs, trial)
            deployed = _deployed_metric(prefix, batches, metric, name, threads)
            drop = sign * (float_metric - deployed)
            attempts.append({"kept_float": list(kept), "deployed_metric": deployed, "drop": drop,
                             "int8_layers": len(report.int8_layers),
                             "speedup": (report.speed or {}).get("speedup")})
            logger.info("accuracy fallback: %d layer(s) in float, deployed %s %.4f, drop %.4f (max_drop %g)",
                        len(kept), name, deployed, drop, max_drop)
            remaining = [n for n in ranking if n not in kept and n in report.int8_layers]
            if drop <= max_drop or not remaining or len(report.int8_layers) <= 1:
                break
            kept.append(remaining[0])
    finally:
        shutil.rmtree(trials, ignore_errors=True)
    chosen = attempts[-1]
    record = {
        "metric": name, "mode": mode, "max_drop": max_drop, "eval_batches": len(batches),
        "float_metric": float_metric, "deployed_metric": chosen["deployed_metric"], "drop": chosen["drop"],
        "met": chosen["drop"] <= max_drop, "kept_float": list(kept), "ranking": ranking, "attempts": attempts,
        "speedup_all_int8": attempts[0].get("speedup"), "speedup_chosen": chosen.get("speedup"),
    }
    final_options = dataclasses.replace(options, keep_float=(*options.keep_float, *kept), accuracy=record)
    report = export(model, path, input_spec, sample_inputs, final_options)
    if not record["met"]:
        logger.warning("accuracy fallback: the deployed model still loses %.4g (> max_drop %g) with %d layer(s) "
                       "in float; no int8 layer is left to keep in float", chosen["drop"], max_drop, len(kept))
    return report
