"""The accuracy-aware fallback (max_drop): the most sensitive layers stay float until the deployed drop is met."""
from __future__ import annotations

import json

import paddle
import pytest

from qtrainer.quant.export import export_quantized_model
from qtrainer.quant.export.isa import has_vnni
from qtrainer.quant.methods.ptq import PTQ, calibrate, freeze
from tests.quant.diagnostics.test_sensitivity import PER_TENSOR, _sabotaged_cnn, _teacher_loader

SPEC = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]


def _per_tensor_ptq():
    model = _sabotaged_cnn()
    loader = _teacher_loader(model)  # the float model's own labels: float accuracy 1.0
    quantized = PTQ(**PER_TENSOR).quantize(model)
    calibrate(quantized, [paddle.to_tensor(images) for images, _ in loader[:2]])
    freeze(quantized)
    return quantized, loader


def test_max_drop_keeps_the_destroyed_layer_float_and_nothing_else(tmp_path):
    quantized, loader = _per_tensor_ptq()
    prefix = str(tmp_path / "m")
    report = export_quantized_model(quantized, prefix, input_spec=SPEC, sample_inputs=[x for x, _ in loader],
                                    max_drop=0.05, eval_loader=loader, measure_speed=False)
    accuracy = report.accuracy
    assert accuracy["float_metric"] == 1.0
    first = accuracy["attempts"][0]
    assert first["kept_float"] == [] and first["drop"] > 0.3  # all int8: per-tensor fc rounds to zero
    assert accuracy["met"] and accuracy["drop"] <= 0.05
    assert accuracy["kept_float"] == accuracy["ranking"][:len(accuracy["kept_float"])]  # in ranking order
    assert accuracy["kept_float"][0] == "fc" and report.kept_float["fc"] == "keep_float"
    if has_vnni():  # s8 inputs are exact: fc alone is enough (without VNNI the signed conv1 may follow)
        assert accuracy["kept_float"] == ["fc"] and sorted(report.int8_layers) == ["conv1", "conv2"]
    with open(prefix + ".quant.json") as handle:
        assert json.load(handle)["accuracy"]["kept_float"] == ["fc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pdiparams", "m.pdiparams.info", "m.pdmodel", "m.quant.json"]


def test_an_unreachable_max_drop_is_reported_not_met(tmp_path):
    quantized, loader = _per_tensor_ptq()
    report = export_quantized_model(quantized, str(tmp_path / "m"), input_spec=SPEC, sample_inputs=[x for x, _ in loader],
                                    max_drop=0.0, eval_loader=loader, metric=lambda logits, labels: -1e-3 * len(labels)
                                    + float((logits.argmax(1) == labels).mean()) - 0.01, measure_speed=False)
    assert report.accuracy["met"] is (report.accuracy["drop"] <= 0.0)
    assert len(report.accuracy["attempts"]) >= 2


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_drop": -0.1, "eval_loader": [1]}, ValueError, r"max_drop=-0.1 must be a number >= 0"),
    ({"max_drop": 0.01}, ValueError, r"max_drop needs eval_loader"),
    ({"eval_loader": [1]}, ValueError, r"used by the accuracy-aware fallback only: give max_drop"),
    ({"max_drop": 0.01, "eval_loader": [1], "metric": "accuracy"}, TypeError, r"metric must be a callable"),
    ({"max_drop": 0.01, "eval_loader": [1], "metric_mode": "best"}, ValueError, r"mode='best' is not valid"),
])
def test_bad_fallback_arguments_fail_before_anything_is_written(tmp_path, kwargs, error, match):
    quantized, _ = _per_tensor_ptq()
    with pytest.raises(error, match=match):
        export_quantized_model(quantized, str(tmp_path / "m"), input_spec=SPEC, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_metric_that_returns_no_number_is_named(tmp_path):
    quantized, loader = _per_tensor_ptq()
    with pytest.raises(ValueError, match=r"metric <lambda> returned str 'good'"):
        export_quantized_model(quantized, str(tmp_path / "m"), input_spec=SPEC, max_drop=0.01, eval_loader=loader,
                               metric=lambda logits, labels: "good")
    assert list(tmp_path.iterdir()) == []
