"""The per-layer PTQ report: thresholds of every method on one histogram, SQNR, sorting, files."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant.observers.thresholds import kl_threshold, mse_threshold, percentile_threshold
from qtrainer.quant.methods.ptq import PTQ, calibrate, calibration_layers, freeze
from qtrainer.quant.diagnostics.ptq_report import COLUMNS, build_ptq_report
from qtrainer.quant.methods.qat import QAT

from quant.ptq_fixtures import calibration_batches, trained_cnn


def _calibrated(name="KLQuantizer", **kwargs):
    model = PTQ(name, **kwargs).quantize(trained_cnn(), fuse=True)
    calibrate(model, calibration_batches(4))
    return freeze(model)


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return 10 * math.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))


def test_every_method_is_computed_on_the_calibration_histogram():
    model = _calibrated("KLQuantizer")
    report = build_ptq_report(model, calibration_batches(2))
    assert sorted(row.name for row in report.layers) == ["0", "4", "9"]
    for row in report.layers:
        cal = dict(calibration_layers(model))[row.name].act_quanter.observer
        counts, width = cal.histogram(exclude_zeros=False)
        nonzero, _ = cal.histogram(exclude_zeros=True)
        assert row.histogram_source == "calibration" and row.calibrator == "KLQuantizer"
        assert row.kl == row.threshold  # the chosen method, recomputed from the same histogram
        assert row.kl == kl_threshold(nonzero, width, 8)
        assert row.mse == mse_threshold(nonzero, width, 8)
        assert row.hist == percentile_threshold(counts, width, 0.99999)
        assert 0 < row.hist <= row.absmax + width  # within one search bin of the fine-histogram max
        assert 0.0 <= row.clipped_fraction < 1.0


def test_absmax_layers_get_a_histogram_from_the_report_batches():
    model = _calibrated("AbsmaxQuantizer")
    batches = calibration_batches(4)
    report = build_ptq_report(model, batches)
    first = next(row for row in report.layers if row.name == "0")
    assert first.histogram_source == "report batches"
    assert first.threshold == pytest.approx(float(np.abs(np.concatenate([b.numpy() for b in batches])).max()))
    assert first.absmax == first.threshold
    assert all(row.kl is not None and row.mse is not None for row in report.layers)


def test_sqnr_columns_match_a_direct_computation():
    paddle.seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    model = PTQ("AbsmaxQuantizer").quantize(net)
    x = paddle.randn([32, 8])
    calibrate(model, [x])
    freeze(model)
    report = build_ptq_report(model, [x])
    rows = {row.name: row for row in report.layers}
    with paddle.no_grad():
        h_float = net[1](net[0](x))
        first_q = model[0](x)
        h_quant = model[1](first_q)
        out_quant = model[2](h_quant)
        out_alone = net[2](h_quant)  # the float second layer on the quantized model's input
        out_float = net(x)
    assert rows["0"].sqnr_db == pytest.approx(_sqnr(net[0](x).numpy(), first_q.numpy()), rel=1e-9)
    assert rows["0"].accumulated_sqnr_db == pytest.approx(rows["0"].sqnr_db, rel=1e-9)
    assert rows["2"].sqnr_db == pytest.approx(_sqnr(out_alone.numpy(), out_quant.numpy()), rel=1e-9)
    assert rows["2"].accumulated_sqnr_db == pytest.approx(_sqnr(out_float.numpy(), out_quant.numpy()), rel=1e-9)
    assert report.output_sqnr_db == pytest.approx(rows["2"].accumulated_sqnr_db, rel=1e-9)
    assert h_float.shape == h_quant.shape
    # the report left the model as it was: frozen, quantizing, same output
    np.testing.assert_array_equal(model(x).numpy(), out_quant.numpy())


def test_rows_are_sorted_worst_first_and_a_damaged_layer_comes_first():
    model = _calibrated("HistQuantizer")
    layers = dict(calibration_layers(model))
    layers["4"].act_quanter.observer.hist_percent = 0.5  # clip half the values of one layer
    layers["4"].act_quanter.observer._cache = None
    report = build_ptq_report(model, calibration_batches(2))
    sqnrs = [row.sqnr_db for row in report.layers]
    assert sqnrs == sorted(sqnrs)
    assert report.worst(1) == ["4"]
    assert report.layers[0].clipped_fraction > 0.3


def test_files_scalars_and_histograms(tmp_path):
    report = build_ptq_report(_calibrated("MSEQuantizer"), calibration_batches(2))
    files = report.write(str(tmp_path / "sub" / "model"))
    assert files == {"json": str(tmp_path / "sub" / "model.ptq_report.json"),
                     "csv": str(tmp_path / "sub" / "model.ptq_report.csv")}
    data = json.loads(open(files["json"]).read())
    assert data["format"] == "qtrainer-ptq-report" and data["batches"] == 2 and data["samples"] == 128
    assert [row["name"] for row in data["layers"]] == [row.name for row in report.layers]
    with open(files["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(COLUMNS)
    assert [float(r["sqnr_db"]) for r in rows] == sorted(float(r["sqnr_db"]) for r in rows)
    assert float(rows[0]["threshold"]) == pytest.approx(report.layers[0].threshold)
    scalars = report.scalars()
    name = report.layers[0].name
    assert scalars[f"quant/act_threshold/{name}"] == report.layers[0].threshold
    assert scalars[f"quant/act_threshold_mse/{name}"] == report.layers[0].mse
    assert scalars["quant/summary/min_output_sqnr_db"] == report.layers[0].sqnr_db
    edges, counts = report.histograms()["quant/act_histogram/0"]
    assert edges.size == counts.size + 1 and edges[0] == 0 and counts[-1] > 0
    assert counts.sum() == 4 * 64 * 28 * 28  # every input value of the 4 calibration batches


def test_report_needs_a_frozen_model_and_samples():
    model = PTQ().quantize(trained_cnn())
    calibrate(model, calibration_batches(1))
    with pytest.raises(RuntimeError, match="still calibrating"):
        build_ptq_report(model, calibration_batches(1))
    freeze(model)
    with pytest.raises(ValueError, match="needs sample_inputs"):
        build_ptq_report(model, None)
    with pytest.raises(ValueError, match="no quantized layer"):
        build_ptq_report(trained_cnn(), calibration_batches(1))


def test_a_qat_model_is_reported_too():
    paddle.seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    QAT().quantize(net)
    x = paddle.randn([16, 8])
    net.train()
    net(x)  # one training forward sets the moving-average scales
    report = build_ptq_report(net, [x])
    assert all(row.histogram_source == "report batches" and math.isfinite(row.sqnr_db) for row in report.layers)
