"""Tests of qtrainer/quant/export/report.py: the JSON content and the summary."""
from __future__ import annotations

from qtrainer.quant.export.report import FORMAT_NAME, ExportReport, LayerExport


def _layer(name, export, reason=None):
    return LayerExport(name=name, type="Conv2D", export=export, reason=reason, act_bits=8, weight_bits=8,
                       weight_axis=0, act_pact=False)


def test_report_lists_int8_and_kept_float_layers_in_its_json():
    report = ExportReport(path="/x/model", files={}, layers=[_layer("a", "int8"), _layer("b", "float", "keep_float")],
                          input_spec=[], run_id="r1")
    content = report.to_dict()
    assert content["format"] == FORMAT_NAME and content["run_id"] == "r1"
    assert content["int8_layers"] == ["a"] and content["kept_float"] == {"b": "keep_float"}
    assert report.passed is None and "float: b (keep_float)" in report.summary()
