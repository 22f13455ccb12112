"""PTQCallback inside Trainer.fit: calibrates (no training), validates, logs, reports and exports."""
from __future__ import annotations

import copy
import csv
import json
import os
import struct

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer import Callback, ClassificationModule, Trainer
from qtrainer.loggers import CSVLogger, TensorBoardLogger
from qtrainer.quant.transforms.fuse import fuse_conv_bn
from qtrainer.quant.methods.ptq import PTQ, calibration_layers, calibration_state
from qtrainer.callbacks.ptq import PTQCallback
from qtrainer.quant.methods.qat import QAT
from qtrainer.quant.transforms.wrap import iter_quanted_layers

from helpers import quiet_trainer_kwargs
from quant.ptq_fixtures import datasets, predictions, trained_cnn

BATCH = 64


def _module():
    return ClassificationModule(trained_cnn(), lr=0.01)


def _loaders():
    train, test = datasets()
    return (paddle.io.DataLoader(train, batch_size=BATCH, shuffle=True),
            paddle.io.DataLoader(test, batch_size=128, shuffle=False))


class _Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_epoch_start(self, trainer, module):
        self.calls.append("on_train_epoch_start")

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.calls.append("on_train_batch_start")

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.calls.append("on_before_optimizer_step")

    def on_validation_start(self, trainer, module):
        self.calls.append(("validation", trainer.sanity_checking,
                           calibration_state(module) if calibration_layers(module) else None))


def test_calibrates_without_training_and_without_changing_the_weights(tmp_path):
    module = _module()
    expected = copy.deepcopy(module.net)
    fuse_conv_bn(expected)  # the only change PTQCallback may make to the float weights
    recorder = _Recorder()
    callback = PTQCallback({"activation_quantizer": "HistQuantizer"}, calib_epochs=2, calib_batches=3,
                           export_dir=False, report=False)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=5, num_sanity_val_steps=2))
    trainer.fit(module, *_loaders(), callbacks=[recorder, callback])

    assert (trainer.global_step, trainer.current_epoch) == (0, 0)
    assert not [c for c in recorder.calls if isinstance(c, str)]  # no epoch, batch or optimizer step
    # the sanity check ran while paused, the real validation on the frozen model
    assert [c for c in recorder.calls if isinstance(c, tuple)] == [
        ("validation", True, "paused"), ("validation", False, "frozen")]
    assert callback.calibration_batches == 6 and callback.fused_pairs == [("net.0", "net.1"), ("net.4", "net.5")]
    own = module.net.state_dict()
    for key, value in expected.state_dict().items():
        np.testing.assert_array_equal(own[key].numpy(), value.numpy(), err_msg=key)
    # exactly the calibration batches were observed (not the sanity-check batches): 6 x 64 inputs
    head = dict(calibration_layers(module))["net.9"].act_quanter.observer
    assert int(head.hist.numpy().sum()) == 6 * BATCH * 16 * 7 * 7
    # the optimizer was built after the fusion, from the fused parameters (new conv biases included)
    optimized = {id(p) for p in trainer.optimizers[0]._parameter_list}
    assert id(module.net[0].bias) in optimized and id(module.net[0].weight) in optimized


def test_validates_logs_reports_and_exports(tmp_path):
    module = _module()
    float_net = copy.deepcopy(module.net)
    train_loader, val_loader = _loaders()
    logger = CSVLogger(str(tmp_path))
    callback = PTQCallback(calib_batches=4, check_batches=2)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=3, logger=logger))
    trainer.fit(module, train_loader, val_loader, callbacks=[callback])

    # validation of the quantized model, recorded in the history
    _, test = datasets()
    quant_acc = float((predictions(module, test.images) == test.labels).mean())
    float_acc = float((predictions(float_net, test.images) == test.labels).mean())
    assert callback.validation_metrics["val_acc"] == pytest.approx(quant_acc, abs=1e-6)
    assert [h["val_acc"] for h in trainer.log_history if "val_acc" in h] == [callback.validation_metrics["val_acc"]]
    assert abs(quant_acc - float_acc) <= 0.04

    # statistics, read back from the CSV logger
    with open(logger.metrics_file_path) as handle:
        rows = list(csv.DictReader(handle))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k != "step"}
    first = module.net[0]
    assert logged["quant/act_threshold/net.0"] == pytest.approx(float(first.act_scale().numpy()[0]))
    for stat in ("act_threshold_kl", "act_threshold_hist", "act_threshold_mse", "act_threshold_absmax",
                 "act_clip_fraction", "output_sqnr_db", "accumulated_output_sqnr_db", "weight_sqnr_db"):
        for layer in ("net.0", "net.4", "net.9"):
            assert np.isfinite(logged[f"quant/{stat}/{layer}"]), (layer, stat)
    assert logged["quant/act_threshold_kl/net.0"] == logged["quant/act_threshold/net.0"]  # KL is the default
    assert "quant/summary/model_output_sqnr_db" in logged

    # the export and the per-layer table next to it
    export = os.path.join(logger.log_dir, "export")
    for name in ("model.pdmodel", "model.pdiparams", "model.quant.json", "model.ptq_report.json",
                 "model.ptq_report.csv"):
        assert os.path.exists(os.path.join(export, name)), name
    exported = callback.export_report
    assert exported.passed and exported.int8_layers  # the self-check may keep a signed-input layer in float
    assert sorted([*exported.int8_layers, *exported.kept_float]) == ["net.0", "net.4", "net.9"]
    with open(callback.report_files["csv"]) as handle:
        table = list(csv.DictReader(handle))
    assert sorted(r["name"] for r in table) == ["net.0", "net.4", "net.9"]
    assert [float(r["sqnr_db"]) for r in table] == sorted(float(r["sqnr_db"]) for r in table)
    with open(callback.report_files["json"]) as handle:
        assert json.load(handle)["samples"] == 2 * 128


def _histogram_events(log_dir):
    from tensorboardX.proto.event_pb2 import Event

    found = {}
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        data = open(os.path.join(log_dir, name), "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            for value in event.summary.value:
                if value.HasField("histo"):
                    found[value.tag] = value.histo
    return found


def test_activation_histograms_reach_tensorboard(tmp_path):
    logger = TensorBoardLogger(str(tmp_path))
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, logger=logger))
    trainer.fit(_module(), *_loaders(), callbacks=[PTQCallback(calib_batches=2, export_dir=False, report=False)])
    histograms = _histogram_events(logger.log_dir)
    act = histograms["quant/act_histogram/net.0"]
    assert act.num == 2 * BATCH * 28 * 28  # every value of the input layer's calibration batches
    assert act.min >= 0 and act.max >= 2.0  # |x| of the normalised images reaches (1 - 0.286) / 0.353
    assert sum(act.bucket) == act.num
    assert "quant/weight_scale/net.0" in histograms  # the weight statistics QAT logs too


def test_layout_and_per_layer_charts_reach_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="TensorBoard's event reader is not installed")
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(str(tmp_path))
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, logger=logger))
    trainer.fit(_module(), *_loaders(), callbacks=[PTQCallback(calib_batches=2, check_batches=1, export_dir=False,
                                                               report=False)])
    acc = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"quant/act_threshold/net.0", "quant/output_sqnr_db/net.9"} <= set(tags["scalars"])
    assert {f"quant_charts/{stat}" for stat in ("weight_sqnr_db", "output_sqnr_db", "act_clip_fraction",
                                                "act_scale")} == set(tags["images"])
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["act_threshold"] == ["quant/act_threshold/.*"]  # the report's statistics too
    assert {"act_threshold_kl", "output_sqnr_db", "weight_sqnr_db", "model_output_sqnr_db"} <= set(charts)


class _Nothing:
    """An iterable of batches that yields none (and has no length)."""

    def __iter__(self):
        return iter(())


def test_empty_calibration_data_is_a_clear_error(tmp_path):
    module = _module()
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, num_sanity_val_steps=0))
    with pytest.raises(ValueError, match="yielded no batch"):
        trainer.fit(module, _Nothing(), callbacks=[PTQCallback(export_dir=False)])
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(ValueError, match="yields no batches"):  # a loader of length 0: the Trainer's check
        trainer.fit(_module(), [], callbacks=[PTQCallback(export_dir=False)])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"calib_epochs": 0}, ValueError, r"calib_epochs=0"),
    ({"calib_batches": 0}, ValueError, r"calib_batches=0"),
    ({"check_batches": -1}, ValueError, r"check_batches=-1"),
    ({"config": "KLQuantizer"}, TypeError, r"dict of PTQ arguments"),
    ({"config": {"activation_quantizer": "Entropy"}}, ValueError, r"unknown activation_quantizer"),
    ({"bias_batches": 0}, ValueError, r"bias_batches=0"),
    ({"max_drop": -1}, ValueError, r"max_drop=-1 must be a number >= 0"),
    ({"eval_batches": 0}, ValueError, r"eval_batches=0"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PTQCallback(**kwargs)


def test_module_errors_at_fit(tmp_path):
    quantized = _module()
    QAT().quantize(quantized)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(ValueError, match="already quantized"):
        trainer.fit(quantized, *_loaders(), callbacks=[PTQCallback(export_dir=False)])
    module = _module()
    with pytest.raises(ValueError, match="not a sublayer"):
        trainer.fit(module, *_loaders(), callbacks=[PTQCallback(fuse_list=[["net.0", "net.2x"]], export_dir=False)])
    assert not list(iter_quanted_layers(module)) and isinstance(module.net[1], nn.BatchNorm2D)


@pytest.mark.parametrize("bar", [True, False])
def test_progress_bar_follows_the_trainer(tmp_path, capsys, bar):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, enable_progress_bar=bar))
    trainer.fit(_module(), *_loaders(), callbacks=[PTQCallback(calib_batches=2, export_dir=False, report=False)])
    assert ("Calibrating" in capsys.readouterr().err) is bar


def test_other_stages_leave_the_module_alone(tmp_path):
    module = _module()
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path))
    trainer.validate(module, _loaders()[1], callbacks=[PTQCallback()])
    assert not list(iter_quanted_layers(module))


def test_a_ptq_instance_and_the_report_without_export(tmp_path):
    callback = PTQCallback(PTQ("MSEQuantizer", skip_patterns=["net.9"]), calib_batches=2, export_dir=False)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    module = _module()
    trainer.fit(module, *_loaders(), callbacks=[callback])
    assert callback.quantized_layers == ["net.0", "net.4"] and isinstance(module.net[9], nn.Linear)
    assert callback.export_report is None
    assert callback.report_files["csv"] == os.path.join(trainer.log_dir, "ptq.ptq_report.csv")
    assert all(row.calibrator == "MSEQuantizer" for row in callback.report.layers)


def test_an_existing_export_is_refused_before_calibrating(tmp_path):
    """Run twice with the same export_dir: the second fit stops before calibrating, the first export stays."""
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.quant.json").write_text('{"run_id": "an earlier run"}')
    callback = PTQCallback(calib_batches=1, export_dir=str(tmp_path / "export"), report=False)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(FileExistsError, match=r"PTQCallback: .*written by another run.*overwrite"):
        trainer.fit(_module(), *_loaders(), callbacks=[callback])
    assert callback.calibration_batches == 0
    assert (tmp_path / "export" / "model.quant.json").read_text() == '{"run_id": "an earlier run"}'


def test_bias_correction_and_max_drop_reach_the_engine_and_the_export(tmp_path):
    callback = PTQCallback({"weight_bits": 4}, calib_batches=2, bias_correction=True, bias_batches=2, max_drop=0.02,
                           eval_batches=2, export_dir=str(tmp_path / "export"), report=False)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(_module(), *_loaders(), callbacks=[callback])
    corrected = callback.bias_correction_result
    assert corrected.batches == 2 and set(corrected.corrected) == set(callback.quantized_layers)
    accuracy = callback.export_report.accuracy
    assert accuracy["max_drop"] == 0.02 and accuracy["eval_batches"] == 2
    assert accuracy["met"] is (accuracy["drop"] <= 0.02) and accuracy["attempts"]
    with open(tmp_path / "export" / "model.quant.json") as handle:
        assert json.load(handle)["accuracy"]["kept_float"] == accuracy["kept_float"]


def test_max_drop_without_a_validation_loader_is_a_clear_error(tmp_path):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(ValueError, match=r"max_drop=...\) needs a validation loader"):
        trainer.fit(_module(), _loaders()[0], callbacks=[PTQCallback(calib_batches=2, max_drop=0.01,
                                                                       export_dir=str(tmp_path / "e"), report=False)])
