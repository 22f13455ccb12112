"""QATCallback inside Trainer.fit: quantizes before the optimizer, trains PACT α, resumes exactly, logs scales."""
from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer import Callback, ClassificationModule, Trainer
from qtrainer.callbacks import ModelCheckpoint
from qtrainer.checkpoint_io import CheckpointError
from qtrainer.loggers import CSVLogger, Logger, TensorBoardLogger
from qtrainer.quant import QATCallback, iter_quanted_layers

from helpers import NoisyPoints, quiet_trainer_kwargs


def small_cnn():
    return nn.Sequential(nn.Conv2D(1, 4, 3, padding=1, bias_attr=False), nn.BatchNorm2D(4), nn.ReLU(),
                         nn.MaxPool2D(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


class Images(paddle.io.Dataset):
    """NoisyPoints reshaped into 8x8 one-channel images (loading consumes NumPy's RNG)."""

    def __init__(self, n=64):
        self.points = NoisyPoints(n, features=64)

    def __len__(self):
        return len(self.points)

    def __getitem__(self, i):
        x, y = self.points[i]
        return x.reshape(1, 8, 8), y


def loaders():
    return (paddle.io.DataLoader(Images(), batch_size=8, shuffle=True),
            paddle.io.DataLoader(Images(32), batch_size=16, shuffle=False))


def module():
    paddle.seed(0)
    return ClassificationModule(small_cnn(), lr=0.01)


def test_quantizes_before_the_optimizer_so_pact_alpha_trains(tmp_path):
    model = module()
    callback = QATCallback({"activation_preprocess_type": "PACT", "pact_warmup_steps": 2}, export_dir=False)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(model, *loaders(), callbacks=[callback])
    quanted = dict(iter_quanted_layers(model))
    assert sorted(quanted) == ["net.0", "net.5"] and callback.quantized_layers == ["net.0", "net.5"]
    alphas = [p for layer in quanted.values() for p in layer.act_preprocess.parameters()]
    optimized = {id(p) for p in trainer.optimizers[0]._parameter_list}
    assert alphas and all(id(a) in optimized for a in alphas)
    # a second fit of the same (already quantized) module does not quantize again
    trainer.fit(model, *loaders(), callbacks=[QATCallback({"activation_preprocess_type": "PACT"}, export_dir=False)])
    assert sorted(dict(iter_quanted_layers(model))) == ["net.0", "net.5"]


def test_pact_alpha_moves_during_training(tmp_path):
    model = module()
    QATCallback({"activation_preprocess_type": "PACT", "pact_warmup_steps": 0}).configure_model(None, model)
    alphas = [float(l.act_preprocess.alpha.numpy()[0]) for _, l in iter_quanted_layers(model)]
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(model, *loaders(), callbacks=[QATCallback(export_dir=False)])
    after = [float(l.act_preprocess.alpha.numpy()[0]) for _, l in iter_quanted_layers(model)]
    assert any(abs(a - b) > 1e-6 for a, b in zip(alphas, after))


def _fit(root, epochs, ckpt_path=None):
    model = module()
    trainer = Trainer(**quiet_trainer_kwargs(root, max_epochs=epochs, seed=3, enable_checkpointing=True,
                                             callbacks=[ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True)]))
    trainer.fit(model, *loaders(), callbacks=[QATCallback({"activation_preprocess_type": "PACT", "pact_warmup_steps": 5},
                                                          export_dir=False)], ckpt_path=ckpt_path)
    return model, trainer


def test_resume_restores_quantization_state_exactly(tmp_path):
    full, full_trainer = _fit(tmp_path / "full", 3)
    _fit(tmp_path / "part", 1)
    resumed, resumed_trainer = _fit(tmp_path / "part", 3, ckpt_path="last")
    a, b = full.state_dict(), resumed.state_dict()
    assert set(a) == set(b) and any("act_quanter" in k or "act_preprocess" in k for k in a)
    assert max(float(np.abs(a[k].numpy() - b[k].numpy()).max()) for k in a) <= 1e-6
    assert [r.get("val_loss") for r in full_trainer.log_history] == [r.get("val_loss") for r in resumed_trainer.log_history]


def test_resuming_a_qat_checkpoint_without_the_callback_names_the_problem(tmp_path):
    _fit(tmp_path, 1)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=2))
    with pytest.raises(CheckpointError, match="unexpected keys.*without QAT"):
        trainer.fit(module(), *loaders(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_scale_statistics_reach_the_logger(tmp_path):
    logger = CSVLogger(str(tmp_path))
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=4))
    trainer.fit(module(), *loaders(), callbacks=[QATCallback(export_dir=False)])
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    columns = set(rows[0])
    assert {"quant/act_scale/net.0", "quant/weight_sqnr_db/net.0", "quant/act_clip_fraction/net.5"} <= columns
    steps = [r["step"] for r in rows if r.get("quant/act_scale/net.0")]
    assert steps == ["4", "8", "8"]  # every log_every_n_steps, and at the epoch end
    scale = [float(r["quant/act_scale/net.0"]) for r in rows if r.get("quant/act_scale/net.0")]
    assert all(s > 0 for s in scale)
    clip = [r["quant/act_clip_fraction/net.5"] for r in rows if r.get("quant/act_clip_fraction/net.5")]
    assert clip and all(0.0 <= float(c) <= 1.0 for c in clip)


def _stat_steps(tmp_path, epochs=1, **callback_kwargs):
    """Steps of the CSV rows holding statistics, and those holding a clipped fraction, of a QAT fit."""
    logger = CSVLogger(str(tmp_path))
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=epochs, logger=logger, log_every_n_steps=50))
    trainer.fit(module(), *loaders(), callbacks=[QATCallback(export_dir=False, **callback_kwargs)])
    rows = list(csv.DictReader(open(logger.metrics_file_path)))
    return ([r["step"] for r in rows if r.get("quant/act_scale/net.0")],
            [r["step"] for r in rows if r.get("quant/act_clip_fraction/net.0")])


def test_statistics_default_to_every_10_steps_in_a_short_run(tmp_path):
    steps, clipped = _stat_steps(tmp_path, epochs=2)  # 8 steps per epoch; the trainer logs every 50
    assert steps == ["8", "10", "16"]  # the first epoch's end, step 10, the second epoch's end
    assert clipped == steps  # measured on the logging steps and the last batch of each epoch


def test_statistics_follow_log_stats_every_n_steps(tmp_path):
    steps, _ = _stat_steps(tmp_path, log_stats_every_n_steps=3)
    assert steps == ["3", "6", "8"]


@pytest.mark.parametrize("value", [0, -2, 2.5, True, "10"])
def test_a_bad_log_stats_interval_is_named(value):
    with pytest.raises(ValueError, match=rf"QATCallback\(log_stats_every_n_steps={value!r}\): use a positive integer"):
        QATCallback(export_dir=False, log_stats_every_n_steps=value)


class _Recording(Logger):
    """A logger that keeps what reaches it."""

    def __init__(self):
        self.metrics, self.layouts, self.images = {}, [], []

    def log_metrics(self, metrics, step):
        self.metrics.update(metrics)

    def log_layout(self, layout):
        self.layouts.append(layout)

    def log_image(self, tag, image, step):
        self.images.append((tag, image.shape, image.dtype, step))


def test_layout_once_and_charts_each_epoch_reach_the_loggers(tmp_path):
    recording = _Recording()
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=2, logger=[recording, CSVLogger(str(tmp_path))],
                                             log_every_n_steps=4))
    trainer.fit(module(), *loaders(), callbacks=[QATCallback(export_dir=False)])
    (layout,) = recording.layouts  # every statistic is there the first time: written once
    assert {"act_scale", "act_clip_fraction", "weight_sqnr_db"} <= set(layout["quant"])
    assert layout["quant"]["act_scale"] == ["Multiline", ["quant/act_scale/.*"]]
    assert {"min_weight_sqnr_db", "mean_act_clip_fraction"} <= set(layout["quant/summary"])
    for charts in layout.values():
        for title, (_, (regex,)) in charts.items():  # every chart has curves
            assert any(re.match(regex, tag) for tag in recording.metrics), title
    images = {(tag, step) for tag, _, _, step in recording.images}
    assert images == {(f"quant_charts/{stat}", step) for stat in ("weight_sqnr_db", "act_clip_fraction", "act_scale")
                      for step in (8, 16)}  # at each epoch end
    assert all(len(shape) == 3 and shape[2] == 3 and dtype == np.uint8 for _, shape, dtype, _ in recording.images)


def test_statistics_reach_tensorboard_grouped_by_statistic(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="TensorBoard's event reader is not installed")
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(str(tmp_path))
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=4))
    trainer.fit(module(), *loaders(), callbacks=[QATCallback(export_dir=False)])
    acc = event_accumulator.EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    quant = [t for t in tags["scalars"] if t.startswith("quant/")]
    assert {"quant/act_scale/net.0", "quant/act_scale/net.5", "quant/weight_sqnr_db/net.0"} <= set(quant)
    assert not [t for t in quant if t.split("/")[1] in ("net.0", "net.5")]  # no per-layer sections
    assert [e.step for e in acc.Scalars("quant/act_scale/net.0")] == [4, 8, 8]
    assert "quant/weight_scale/net.0" in tags["histograms"]
    assert {"quant_charts/weight_sqnr_db", "quant_charts/act_scale"} <= set(tags["images"])
    (image,) = acc.Images("quant_charts/weight_sqnr_db")
    assert image.step == 8 and image.width > 100 and image.height > 20
    (config,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert charts["act_scale"] == ["quant/act_scale/.*"] and charts["weight_sqnr_db"] == ["quant/weight_sqnr_db/.*"]


# -- the export target: this run's own export is replaced on resume, anything else is refused up front
def _export_fit(root, epochs=2, ckpt_path=None, **callback_kwargs):
    """A QAT fit with step checkpoints that exports (no self-check: the lifecycle is under test here)."""
    model = module()
    checkpoint = ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=3, save_top_k=-1, save_last=True)
    callback_kwargs.setdefault("export_kwargs", {"check": False})
    callback = QATCallback(export_dir=str(root / "export"), check_batches=1, **callback_kwargs)
    trainer = Trainer(**quiet_trainer_kwargs(root, max_epochs=epochs, seed=3, enable_checkpointing=True,
                                             callbacks=[checkpoint]))
    trainer.fit(model, *loaders(), callbacks=[callback], ckpt_path=ckpt_path)
    return callback, trainer


def _report(root):
    with open(root / "export" / "model.quant.json") as handle:
        return json.load(handle)


def test_a_run_killed_after_its_export_resumes_and_replaces_its_own_export(tmp_path):
    first, full = _export_fit(tmp_path)  # ran to its export; "killed" right after it
    steps = sorted((f for f in os.listdir(tmp_path / "ckpt") if f != "last.ckpt"),
                   key=lambda f: os.path.getmtime(tmp_path / "ckpt" / f))
    resumed, trainer = _export_fit(tmp_path, ckpt_path=str(tmp_path / "ckpt" / steps[0]))  # retrains, exports
    assert trainer.global_step == full.global_step and resumed.export_report.written
    assert resumed.run_id == first.run_id == _report(tmp_path)["run_id"]
    assert _report(tmp_path)["state"] == "complete"


def test_another_runs_export_is_refused_before_training(tmp_path):
    """A QAT script run twice with logger=False: the second run stops at once, the first export stays."""
    first, _ = _export_fit(tmp_path, epochs=1)
    before = _report(tmp_path)
    model = module()
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(FileExistsError, match=r"written by another run.*overwrite.*export_dir.*versioned"):
        trainer.fit(model, *loaders(), callbacks=[QATCallback(export_dir=str(tmp_path / "export"))])
    assert trainer.global_step == 0 and _report(tmp_path) == before


def test_a_users_file_at_the_export_target_is_refused_before_training(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.pdmodel").write_bytes(b"my own model")
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=1))
    with pytest.raises(FileExistsError, match="not written by a qtrainer run"):
        trainer.fit(module(), *loaders(), callbacks=[QATCallback(export_dir=str(tmp_path / "export"))])
    assert trainer.global_step == 0 and (tmp_path / "export" / "model.pdmodel").read_bytes() == b"my own model"


def test_overwrite_replaces_another_runs_export(tmp_path):
    first, _ = _export_fit(tmp_path, epochs=1)
    second, _ = _export_fit(tmp_path, epochs=1, export_kwargs={"check": False, "overwrite": True})
    assert second.run_id != first.run_id and _report(tmp_path)["run_id"] == second.run_id


class _BatchNormTrace(Callback):
    """The batch norm's running mean and scale after every optimizer step."""

    def __init__(self):
        self.means, self.scales = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        bn = module.net[1]
        self.means.append(bn._mean.numpy().copy())
        self.scales.append(bn.weight.numpy().copy())


def test_batch_norm_statistics_freeze_after_n_steps_and_its_scale_keeps_training(tmp_path):
    trace = _BatchNormTrace()
    callback = QATCallback(freeze_bn_after_steps=3, export_dir=False, log_stats=False)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=7, max_epochs=2))
    four_batches = paddle.io.DataLoader(Images(32), batch_size=8, shuffle=True)  # 2 epochs, validated in between
    trainer.fit(module(), four_batches, loaders()[1], callbacks=[callback, trace])
    assert trainer.current_epoch >= 1 and len(trace.means) == 7
    moved = [not np.array_equal(a, b) for a, b in zip(trace.means, trace.means[1:])]
    assert moved[:2] == [True, True]  # steps 2 and 3 still update the statistics
    assert not any(moved[2:])  # from step 4 on (global_step >= 3 before it): frozen, across the epoch boundary
    assert not np.array_equal(trace.scales[3], trace.scales[-1])  # gamma still trains
    assert callback.frozen_batch_norms == ["net.1"]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_freeze_bn_after_steps_must_be_a_step_count(bad):
    with pytest.raises(ValueError, match=r"QATCallback\(freeze_bn_after_steps="):
        QATCallback(freeze_bn_after_steps=bad)


def test_max_drop_reaches_the_qat_export(tmp_path):
    callback = QATCallback(max_drop=0.5, eval_batches=1, export_dir=str(tmp_path / "export"), log_stats=False)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(module(), *loaders(), callbacks=[callback])
    accuracy = callback.export_report.accuracy
    assert accuracy["max_drop"] == 0.5 and accuracy["eval_batches"] == 1 and accuracy["met"]
    assert accuracy["kept_float"] == [] and len(accuracy["attempts"]) == 1  # a drop of at most 0.5 needs nothing


def test_qat_max_drop_without_a_validation_loader_fails_before_training(tmp_path):
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=4))
    with pytest.raises(ValueError, match=r"QATCallback\(max_drop=...\) needs a validation loader"):
        trainer.fit(module(), loaders()[0], callbacks=[QATCallback(max_drop=0.01, export_dir=str(tmp_path / "e"))])
    assert trainer.global_step == 0
