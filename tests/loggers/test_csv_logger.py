import csv
import json
import os

import numpy as np
import pytest

from qtrainer.loggers import CSVLogger


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, [dict(zip(header, row)) for row in reader]


def test_header_widens_without_losing_rows(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"loss": 0.5}, step=0)
    logger.log_metrics({"loss": 0.25}, step=1)
    header, rows = read_rows(logger.metrics_file_path)  # each row is on disk at once
    assert header == ["step", "loss"] and len(rows) == 2
    logger.log_metrics({"val_loss": 0.75, "val_acc": 0.5}, step=1)
    logger.log_metrics({"loss": 0.125, "lr-SGD": np.float32(0.5)}, step=2)
    header, rows = read_rows(logger.metrics_file_path)
    assert header == ["step", "loss", "val_loss", "val_acc", "lr-SGD"]
    assert rows == [
        {"step": "0", "loss": "0.5", "val_loss": "", "val_acc": "", "lr-SGD": ""},
        {"step": "1", "loss": "0.25", "val_loss": "", "val_acc": "", "lr-SGD": ""},
        {"step": "1", "loss": "", "val_loss": "0.75", "val_acc": "0.5", "lr-SGD": ""},
        {"step": "2", "loss": "0.125", "val_loss": "", "val_acc": "", "lr-SGD": "0.5"},
    ]
    assert sorted(os.listdir(logger.log_dir)) == ["metrics.csv"]  # no temp file left behind


def test_values_round_trip_exactly(tmp_path):
    logger = CSVLogger(tmp_path)
    values = np.random.default_rng(0).random(20)
    for step, v in enumerate(values):
        logger.log_metrics({"x": v}, step=step)
    _, rows = read_rows(logger.metrics_file_path)
    assert [float(r["x"]) for r in rows] == values.tolist()
    assert [int(r["step"]) for r in rows] == list(range(20))


def test_an_existing_version_is_extended(tmp_path):
    first = CSVLogger(tmp_path, version="run")
    first.log_metrics({"a": 1.0}, step=0)
    again = CSVLogger(tmp_path, version="run")
    again.log_metrics({"b": 2.0}, step=1)
    header, rows = read_rows(again.metrics_file_path)
    assert header == ["step", "a", "b"]
    assert rows == [{"step": "0", "a": "1.0", "b": ""}, {"step": "1", "a": "", "b": "2.0"}]


def test_versions_and_lazy_creation(tmp_path):
    first = CSVLogger(tmp_path)
    assert first.log_dir == str(tmp_path / "csv_logs" / "version_0")
    assert not (tmp_path / "csv_logs").exists()
    first.log_metrics({"a": 1.0}, step=0)
    assert CSVLogger(tmp_path).version == 1
    assert CSVLogger(tmp_path, name="x", version=3).log_dir == str(tmp_path / "x" / "version_3")


def test_hyperparameters_go_to_json(tmp_path):
    logger = CSVLogger(tmp_path)
    params = {"lr": 0.1, "layers": [1, 2], "net": {"act": "relu"}, "obj": object}
    logger.log_hyperparams(params, {"val_loss": 0.3})
    with open(os.path.join(logger.log_dir, "hparams.json")) as f:
        saved = json.load(f)
    assert saved == {"lr": 0.1, "layers": [1, 2], "net": {"act": "relu"}, "obj": str(object)}
    assert not os.path.exists(logger.metrics_file_path)


def test_unwritable_save_dir_is_named(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"save_dir=.*not_a_dir.*is a file"):
        CSVLogger(blocker)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_save_dir_is_named(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            CSVLogger(tmp_path / "logs")
    finally:
        tmp_path.chmod(0o700)


def test_bad_metrics_are_named_and_write_nothing(tmp_path):
    logger = CSVLogger(tmp_path)
    with pytest.raises(TypeError, match=r"metric 'acc' = None is not a number"):
        logger.log_metrics({"loss": 1.0, "acc": None}, step=0)
    with pytest.raises(ValueError, match="'step' is the step column"):
        logger.log_metrics({"step": 1.0}, step=0)
    assert not os.path.exists(logger.metrics_file_path)


def test_images_and_layouts_are_ignored(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_image("chart", np.zeros((2, 2, 3), dtype=np.uint8), step=0)
    logger.log_layout({"quant": {"act_scale": ["Multiline", ["quant/act_scale/.*"]]}})
    assert not os.path.exists(logger.root_dir)  # nothing written: a CSV holds numbers only
