import json
import os
import struct

import numpy as np
import pytest

from qtrainer.loggers import TensorBoardLogger

try:  # TensorBoard's own reader when it is installed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError:
    EventAccumulator = None


def read_events(log_dir):
    """Every Event in the run's event files (TFRecord framing, CRCs checked, tensorboardX protobufs)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    events = []
    for name in sorted(os.listdir(log_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        with open(os.path.join(log_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("Q", header)
            assert struct.unpack("I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + length]
            assert struct.unpack("I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
            pos += 16 + length
            events.append(Event.FromString(body))
    return events


def scalars(log_dir):
    """{tag: [(step, value)]}, read with TensorBoard's EventAccumulator when it is installed."""
    if EventAccumulator is not None:
        acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out = {}
    for event in read_events(log_dir):
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def plugin_records(log_dir, tag):
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    return [
        HParamsPluginData.FromString(v.metadata.plugin_data.content)
        for e in read_events(log_dir) for v in e.summary.value if v.tag == tag
    ]


def test_log_dir_scheme_and_lazy_creation(tmp_path):
    first = TensorBoardLogger(tmp_path, name="exp")
    assert first.log_dir == str(tmp_path / "exp" / "version_0")
    assert not (tmp_path / "exp").exists()  # nothing on disk before the first write
    first.log_metrics({"a": 1.0}, step=0)
    assert os.path.isdir(first.log_dir)
    second = TensorBoardLogger(tmp_path, name="exp")
    assert second.version == 1 and second.log_dir.endswith("version_1")
    assert TensorBoardLogger(tmp_path, name="exp", version=7).log_dir == str(tmp_path / "exp" / "version_7")
    assert TensorBoardLogger(tmp_path, name="exp", version="run-a").log_dir == str(tmp_path / "exp" / "run-a")
    assert TensorBoardLogger(tmp_path, name="").log_dir == str(tmp_path / "version_0")
    first.finalize("success")


def test_scalars_read_back_exactly(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    rng = np.random.default_rng(0)
    expected = {"train/loss": [], "val_acc": []}
    for step in range(5):
        loss, acc = float(rng.random()), float(rng.random())
        logger.log_metrics({"train/loss": loss, "val_acc": np.float64(acc)}, step=step * 10)
        expected["train/loss"].append((step * 10, np.float32(loss)))
        expected["val_acc"].append((step * 10, np.float32(acc)))
    logger.save()  # flushed: readable before close
    assert scalars(logger.log_dir) == expected
    logger.finalize("success")


def test_histograms_read_back_exactly(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    values = np.random.default_rng(1).normal(size=(30, 7)).astype(np.float32)
    logger.log_histogram("weights/conv1", values, step=3)
    logger.finalize("success")
    events = read_events(logger.log_dir)
    (histo_event,) = [e for e in events if e.summary.value and e.summary.value[0].HasField("histo")]
    assert histo_event.step == 3 and histo_event.summary.value[0].tag == "weights/conv1"
    histo = histo_event.summary.value[0].histo
    flat = values.astype(np.float64).reshape(-1)
    assert histo.num == flat.size
    assert histo.min == flat.min() and histo.max == flat.max()
    assert histo.sum == pytest.approx(flat.sum(), rel=1e-12, abs=1e-12)
    assert histo.sum_squares == pytest.approx((flat ** 2).sum(), rel=1e-12)
    assert sum(histo.bucket) == flat.size
    assert list(histo.bucket_limit) == sorted(histo.bucket_limit)


def test_hyperparameters_reach_the_hparams_plugin_and_json(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    params = {"lr": 0.1, "optimizer": "sgd", "nesterov": True, "net": {"width": 32}}
    logger.log_hyperparams(params)
    logger.log_metrics({"val_loss": 0.5}, step=10)
    logger.log_metrics({"val_loss": 0.25}, step=20)
    logger.log_hyperparams(params, {"val_loss": 0.25, "test_acc": 0.9})  # final metrics at the end of fit
    logger.finalize("success")

    with open(os.path.join(logger.log_dir, "hparams.json")) as f:
        assert json.load(f) == params
    (start,) = plugin_records(logger.log_dir, "_hparams_/session_start_info")  # written once
    hp = start.session_start_info.hparams
    assert hp["lr"].number_value == 0.1 and hp["optimizer"].string_value == "sgd"
    assert hp["nesterov"].bool_value is True and hp["net/width"].number_value == 32
    (experiment,) = plugin_records(logger.log_dir, "_hparams_/experiment")
    # the -1 placeholder was never filled: the HParams tab compares the real final metrics
    assert sorted(m.name.tag for m in experiment.experiment.metric_infos) == ["test_acc", "val_loss"]
    assert sorted(h.name for h in experiment.experiment.hparam_infos) == ["lr", "nesterov", "net/width", "optimizer"]
    (end,) = plugin_records(logger.log_dir, "_hparams_/session_end_info")
    assert end.session_end_info.status == 1  # STATUS_SUCCESS
    values = scalars(logger.log_dir)
    assert values["hp_metric"] == [(0, -1.0)]
    assert values["val_loss"] == [(10, 0.5), (20, 0.25)]  # the final value is not written twice
    assert values["test_acc"] == [(20, np.float32(0.9))]


@pytest.mark.parametrize("status, code", [("failed", 2), ("interrupted", 2), ("something else", 0)])
def test_run_status_reaches_the_hparams_plugin(tmp_path, status, code):
    logger = TensorBoardLogger(tmp_path, default_hp_metric=False)
    logger.log_hyperparams({"lr": 0.1})
    logger.finalize(status)
    logger.finalize(status)  # a second finalize adds nothing
    (end,) = plugin_records(logger.log_dir, "_hparams_/session_end_info")
    assert end.session_end_info.status == code  # 2 = STATUS_FAILURE, 0 = STATUS_UNKNOWN
    assert "hp_metric" not in scalars(logger.log_dir)


def test_writing_after_finalize_reopens_the_same_run(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_metrics({"a": 1.0}, step=0)
    logger.finalize("success")
    logger.log_metrics({"a": 2.0}, step=1)
    logger.finalize("success")
    assert scalars(logger.log_dir) == {"a": [(0, 1.0), (1, 2.0)]}


def test_repeated_saves_within_one_second_lose_nothing(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    for step in range(4):
        logger.log_metrics({"a": float(step)}, step=step)
        logger.save()  # each save closes an event file; the next write opens another one
    logger.finalize("success")
    assert scalars(logger.log_dir) == {"a": [(s, float(s)) for s in range(4)]}
    assert len([n for n in os.listdir(logger.log_dir) if n.startswith("events.out")]) == 4


def test_unwritable_save_dir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"save_dir=.*a_file.*is a file"):
        TensorBoardLogger(blocker / "logs")


def test_bad_values_are_named(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(TypeError, match=r"metric 'acc' = 'high' is not a number"):
        logger.log_metrics({"acc": "high"}, step=0)
    with pytest.raises(ValueError, match=r"log_histogram\('w'\): no values"):
        logger.log_histogram("w", np.array([]), step=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        logger.log_histogram("w", np.array([1.0, np.nan]), step=0)
    with pytest.raises(ValueError, match="version=-1"):
        TensorBoardLogger(tmp_path, version=-1)


def test_images_read_back_exactly(tmp_path):
    from PIL import Image
    import io

    logger = TensorBoardLogger(tmp_path)
    picture = np.random.default_rng(2).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    logger.log_image("charts/a", picture, step=4)
    logger.finalize("success")
    (event,) = [e for e in read_events(logger.log_dir) if e.summary.value and e.summary.value[0].HasField("image")]
    value = event.summary.value[0]
    assert event.step == 4 and value.tag == "charts/a"
    assert (value.image.height, value.image.width, value.image.colorspace) == (5, 7, 3)
    decoded = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, picture)


def _layouts(log_dir):
    """Every custom-scalars layout record of the run, in the order written, as plain dicts."""
    from tensorboardX.proto.layout_pb2 import Layout

    out = []
    for event in read_events(log_dir):
        for value in event.summary.value:
            if value.tag == "custom_scalars__config__":
                assert value.metadata.plugin_data.plugin_name == "custom_scalars"
                layout = Layout.FromString(value.tensor.string_val[0])
                out.append({c.title: {ch.title: (ch.WhichOneof("content"), list(ch.multiline.tag) or
                                                 [ch.margin.series[0].value, ch.margin.series[0].lower,
                                                  ch.margin.series[0].upper])
                                      for ch in c.chart} for c in layout.category})
    return out


def test_layout_reaches_the_custom_scalars_plugin(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_layout({"quant": {"act_scale": ["Multiline", ["quant/act_scale/.*"]],
                                 "loss": ("Margin", ["loss", "loss_low", "loss_high"])}})
    logger.save()
    logger.log_layout({"quant": {"act_scale": ["Multiline", ["quant/act_scale/.*", "other"]]}})  # replaces
    logger.finalize("success")
    assert _layouts(logger.log_dir) == [
        {"quant": {"act_scale": ("multiline", ["quant/act_scale/.*"]),
                   "loss": ("margin", ["loss", "loss_low", "loss_high"])}},
        {"quant": {"act_scale": ("multiline", ["quant/act_scale/.*", "other"])}},
    ]


@pytest.mark.parametrize("image, error, match", [
    (np.zeros((4, 5), dtype=np.uint8), ValueError, r"log_image\('i'\): needs an HxWxC array.*shape \(4, 5\)"),
    (np.zeros((4, 5, 2), dtype=np.uint8), ValueError, "C = 1, 3 or 4"),
    (np.zeros((0, 5, 3), dtype=np.uint8), ValueError, "HxWxC"),
    (np.zeros((4, 5, 3), dtype=np.float32), TypeError, "needs uint8 pixels, got float32"),
])
def test_bad_images_are_named(tmp_path, image, error, match):
    with pytest.raises(error, match=match):
        TensorBoardLogger(tmp_path).log_image("i", image, step=0)


@pytest.mark.parametrize("layout, error, match", [
    ({}, TypeError, "non-empty mapping"),
    ([("quant", {})], TypeError, "non-empty mapping"),
    ({"quant": {}}, TypeError, "category 'quant'"),
    ({"quant": {3: ["Multiline", ["x"]]}}, TypeError, r"chart titles must be non-empty str, got \[3\]"),
    ({"quant": {"a": ["Bars", ["x"]]}}, ValueError, r"'quant'/'a'.*kind one of 'Multiline', 'Margin'"),
    ({"quant": {"a": ["Multiline"]}}, ValueError, r"use \[kind, \[tag regex"),
    ({"quant": {"a": ["Multiline", "quant/.*"]}}, ValueError, "tags must be a non-empty list"),
    ({"quant": {"a": ["Multiline", []]}}, ValueError, "tags must be a non-empty list"),
    ({"quant": {"a": ["Margin", ["v", "lo"]]}}, ValueError, "a Margin chart needs 3 tags"),
    ({"quant": {"a": ["Multiline", ["quant/(act"]]}}, ValueError, r"'quant/\(act' is not a regex"),
])
def test_bad_layouts_are_named(tmp_path, layout, error, match):
    logger = TensorBoardLogger(tmp_path)
    with pytest.raises(error, match=match):
        logger.log_layout(layout)
    assert not os.path.exists(logger.log_dir)  # refused before anything is written


def _fit_classifier(tmp_path, **trainer_kwargs):
    """A ClassificationModule (it has hparams) fit for 2 epochs with a TensorBoardLogger."""
    import paddle
    from paddle import nn

    from qtrainer import ClassificationModule, Trainer

    from helpers import make_loader, quiet_trainer_kwargs

    paddle.seed(0)
    module = ClassificationModule(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), lr=0.05)
    logger = TensorBoardLogger(tmp_path)
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=2, logger=logger, **trainer_kwargs))
    trainer.fit(module, make_loader(), make_loader(shuffle=False))
    return trainer, logger


def _last(values, tag):
    return values[tag][-1][1]


def test_hp_metric_is_the_final_val_loss_of_a_fit(tmp_path):
    trainer, logger = _fit_classifier(tmp_path)
    values = scalars(logger.log_dir)
    assert values["hp_metric"][0] == (0, -1.0)  # the placeholder, until the fit's end
    assert _last(values, "hp_metric") == np.float32(trainer.callback_metrics["val_loss"])
    assert values["hp_metric"][-1][0] == trainer.global_step
    (experiment,) = plugin_records(logger.log_dir, "_hparams_/experiment")
    columns = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"hp_metric", "val_loss", "val_acc"} <= columns
    assert _last(values, "val_acc") == np.float32(trainer.callback_metrics["val_acc"])


def test_hp_metric_follows_the_monitored_metric(tmp_path):
    from qtrainer.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_acc", mode="max")
    trainer, logger = _fit_classifier(tmp_path, enable_checkpointing=True, callbacks=[checkpoint])
    values = scalars(logger.log_dir)
    assert _last(values, "hp_metric") == np.float32(trainer.callback_metrics["val_acc"])
    assert trainer.callback_metrics["val_acc"] != trainer.callback_metrics["val_loss"]
