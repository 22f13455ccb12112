"""Tests of qtrainer/quant/methods/ptq_pipeline.py: calibrate, reduce, freeze and report in one call."""
from __future__ import annotations

import numpy as np
import paddle
from paddle import nn

from qtrainer.quant import PTQ, calibrate_and_freeze
from qtrainer.quant.methods.ptq import calibration_state


def _model_and_batches():
    paddle.seed(0)
    model = PTQ(activation_quantizer="AbsmaxQuantizer").quantize(nn.Sequential(nn.Conv2D(1, 4, 3), nn.ReLU(),
                                                                                nn.Conv2D(4, 2, 3)))
    rng = np.random.RandomState(0)
    return model, [paddle.to_tensor(rng.standard_normal((2, 1, 8, 8)).astype("float32")) for _ in range(3)]


def test_calibrate_and_freeze_freezes_and_reports():
    model, batches = _model_and_batches()
    result = calibrate_and_freeze(model, batches, report_inputs=batches, report_batches=2)
    assert result.batches == 3 and calibration_state(model) == "frozen"
    assert set(result.thresholds) == {"0", "2"} and all(t > 0 for t in result.thresholds.values())
    assert result.report is not None and {row.name for row in result.report.layers} == {"0", "2"}


def test_ranks_are_reduced_before_the_thresholds_are_frozen():
    model, batches = _model_and_batches()
    calls = []

    def all_reduce(array, op):
        calls.append(op)
        return array * 2 if op == "max" else array  # as if another rank saw twice the abs max

    alone, _ = _model_and_batches()
    single = calibrate_and_freeze(alone, batches)
    reduced = calibrate_and_freeze(model, batches, all_reduce=all_reduce)
    assert "max" in calls and reduced.report is None
    assert reduced.thresholds["0"] == np.float32(2 * single.thresholds["0"])
