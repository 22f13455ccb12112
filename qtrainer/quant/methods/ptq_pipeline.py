"""Static PTQ in one call: calibrate, combine the ranks' statistics, freeze, measure the layers.

``calibrate_and_freeze`` is what ``PTQCallback`` runs when the fit starts; it is the engine's
half of the callback (which then validates, logs and stops the fit). Its own module because it
joins ``ptq`` with the diagnostics (rank sync, per-layer report), which import ``ptq`` themselves.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from paddle import nn

from qtrainer.quant.diagnostics.ptq_report import PTQReport, build_ptq_report
from qtrainer.quant.diagnostics.sync import reduce_calibration_stats
from qtrainer.quant.export.samples import first_inputs
from qtrainer._checks import check_positive_int
from qtrainer.quant.methods.bias_correction import BiasCorrection, correct_bias
from qtrainer.quant.methods.ptq import calibrate, calibration_layers, freeze

__all__ = ["Calibration", "calibrate_and_freeze"]

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """What ``calibrate_and_freeze`` did: batches seen, the frozen thresholds, the per-layer report."""

    batches: int
    thresholds: dict[str, float] = field(default_factory=dict)
    report: PTQReport | None = None
    bias_correction: BiasCorrection | None = None


def calibrate_and_freeze(
    model: nn.Layer,
    loader: Iterable,
    *,
    num_batches: int | None = None,
    epochs: int = 1,
    forward: Callable[[Any, int], Any] | None = None,
    progress: bool = False,
    all_reduce: Callable[[np.ndarray, str], np.ndarray] | None = None,
    report_inputs: Iterable | None = None,
    report_batches: int = 4,
    bias_correction: bool = False,
    bias_batches: int = 8,
) -> Calibration:
    """Calibrate a ``PTQ.quantize``'d ``model`` on ``loader`` and freeze it; return a ``Calibration``.

    ``num_batches``, ``epochs``, ``forward``, ``progress``: as ``calibrate``. ``all_reduce``
    (``trainer.strategy.all_reduce`` in a data-parallel run; call this on every rank) combines the
    ranks' statistics before the thresholds are frozen (``reduce_calibration_stats``).
    ``report_inputs`` (a loader or a list of input batches; None = no report): the first
    ``report_batches`` of them measure the per-layer report (``build_ptq_report``).
    ``bias_correction``: after freezing, correct each quantized layer's bias by its mean output
    error on the first ``bias_batches`` batches of ``loader`` (``qtrainer.quant.methods.bias_correction``).
    """
    check_positive_int("bias_batches", bias_batches)
    batches = calibrate(model, loader, num_batches=num_batches, epochs=epochs, forward=forward, progress=progress)
    if all_reduce is not None:
        reduce_calibration_stats(model, all_reduce)
    freeze(model)
    corrected = None
    if bias_correction:
        corrected = correct_bias(model, first_inputs(loader, min(bias_batches, num_batches or bias_batches)),
                                 all_reduce=all_reduce)
    thresholds = {name: float(layer.act_scale().numpy().reshape(-1)[0]) for name, layer in calibration_layers(model)}
    report = None
    if report_inputs is not None and report_batches > 0:
        samples = first_inputs(report_inputs, report_batches) if not isinstance(report_inputs, list) else report_inputs
        if samples:
            report = build_ptq_report(model, samples, max_batches=report_batches)
            logger.info("PTQ: layers with the lowest output SQNR: %s", ", ".join(
                f"{r.name} ({r.sqnr_db:.1f} dB)" for r in report.layers[:3] if r.sqnr_db is not None))
    return Calibration(batches=batches, thresholds=thresholds, report=report, bias_correction=corrected)
