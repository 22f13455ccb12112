"""Per-layer sensitivity: only-this / all-but-this metrics, ranking, float really float, files, errors."""
from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import paddle
import pytest
from paddle import nn
from PIL import Image

from qtrainer.loggers.base import Logger
from qtrainer.quant.diagnostics.sensitivity import COLUMNS, sensitivity
from qtrainer.quant.transforms.wrap import computing_float
from qtrainer.quant.methods.ptq import PTQ, calibrate, freeze
from qtrainer.quant.methods.qat import QAT
from qtrainer.quant.transforms.residual import residual_sites_of
from qtrainer.quant.transforms.wrap import iter_quanted_layers

#: per-tensor weights: one outlier sets the whole tensor's scale (what makes a layer "sensitive")
PER_TENSOR = {"activation_quantizer": "AbsmaxQuantizer", "weight_quantizer": "AbsmaxQuantizer"}
BATCHES, BATCH_SIZE = 4, 32


class TinyCNN(nn.Layer):
    """conv-relu-conv-relu-pool-flatten-linear on 3x8x8 images, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2D(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = nn.functional.relu(self.conv2(nn.functional.relu(self.conv1(x))))
        return self.fc(paddle.flatten(self.pool(x), 1))


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.standard_normal([BATCH_SIZE, 3, 8, 8]).astype("float32") for _ in range(BATCHES)]


def _logits(model: nn.Layer, images: list[np.ndarray]) -> list[np.ndarray]:
    model.eval()
    with paddle.no_grad():
        return [model(paddle.to_tensor(x)).numpy() for x in images]


def _sabotaged_cnn() -> nn.Layer:
    """A TinyCNN whose ``fc`` per-tensor quantization destroys it, the float model unchanged.

    conv2's channel 0 is dead (zero weights, bias -1e4, so relu gives 0); ``fc`` reads that dead
    feature with a weight of 500: the float output ignores it, but a per-tensor 8-bit scale of
    500/127 rounds every other ``fc`` weight to zero.
    """
    paddle.seed(0)
    model = TinyCNN()
    w2, b2 = model.conv2.weight.numpy(), model.conv2.bias.numpy()
    w2[0], b2[0] = 0.0, -1e4
    model.conv2.weight.set_value(w2)
    model.conv2.bias.set_value(b2)
    fc = model.fc.weight.numpy()
    fc[0, 0] = 500.0
    model.fc.weight.set_value(fc)
    # balanced teacher labels: centre each class's logits over the data
    logits = np.concatenate(_logits(model, _images()))
    model.fc.bias.set_value(model.fc.bias.numpy() - logits.mean(axis=0))
    return model


def _teacher_loader(model: nn.Layer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random images labelled by ``model`` itself: its float accuracy is exactly 1."""
    images = _images()
    labels = [out.argmax(-1).astype("int64") for out in _logits(model, images)]
    counts = np.bincount(np.concatenate(labels), minlength=3)
    assert counts.max() < 0.6 * counts.sum(), counts  # a constant prediction is far from accurate
    return list(zip(images, labels))


def _state(model: nn.Layer) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _assert_same_state(before: dict[str, np.ndarray], model: nn.Layer) -> None:
    after = _state(model)
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


# ---------------------------------------------------------------------- behaviour
def test_the_layer_that_per_tensor_quantization_destroys_ranks_first():
    model = _sabotaged_cnn()
    report = sensitivity(model, _teacher_loader(model), config=PER_TENSOR, calib_batches=2)
    rows = {row.name: row for row in report.layers}
    assert sorted(rows) == ["conv1", "conv2", "fc"]
    assert report.float_metric == 1.0
    assert report.quantized_metric < 0.6
    assert report.ranking()[0] == "fc"
    fc = rows["fc"]
    assert fc.only_this_quantized < 0.6 and fc.drop_only_this == pytest.approx(1.0 - fc.only_this_quantized)
    assert fc.all_but_this_quantized > 0.9  # keeping fc float recovers nearly everything
    assert fc.gain_all_but_this == pytest.approx(fc.all_but_this_quantized - report.quantized_metric)
    for name in ("conv1", "conv2"):  # quantized alone, they barely matter
        assert rows[name].only_this_quantized > 0.9
        assert rows[name].gain_all_but_this < fc.gain_all_but_this
    # the weight SQNR is dominated by the outlier (exact), the output SQNR shows the damage
    assert fc.output_sqnr_db < 3.0 < rows["conv1"].output_sqnr_db
    assert all(math.isfinite(row.weight_sqnr_db) for row in report.layers)
    assert fc.type == "Linear" and rows["conv1"].type == "Conv2D"


def test_a_model_with_one_quantized_layer_gives_the_float_and_quantized_metrics():
    model = _sabotaged_cnn()
    config = {**PER_TENSOR, "skip_patterns": ["conv1", "conv2"]}
    report = sensitivity(model, _teacher_loader(model), config=config, calib_batches=2)
    assert report.ranking() == ["fc"]
    row = report.layers[0]
    assert report.quantized_metric < report.float_metric == 1.0
    assert row.only_this_quantized == report.quantized_metric
    assert row.all_but_this_quantized == report.float_metric


def test_ptq_and_qat_state_agree_on_the_same_quantized_state():
    model = _sabotaged_cnn()
    loader = _teacher_loader(model)
    by_ptq = sensitivity(model, loader, config=PER_TENSOR, calib_batches=2)
    quantized = PTQ(**PER_TENSOR).quantize(model, fuse=True)
    calibrate(quantized, loader, num_batches=2)
    freeze(quantized)
    by_state = sensitivity(quantized, loader, method="qat-state")
    assert by_state.ranking() == by_ptq.ranking()
    assert [r.to_dict() for r in by_state.layers] == [r.to_dict() for r in by_ptq.layers]
    assert (by_state.float_metric, by_state.quantized_metric) == (by_ptq.float_metric, by_ptq.quantized_metric)


def test_eval_batches_limits_the_evaluation():
    model = _sabotaged_cnn()
    seen = []

    def metric(outputs, labels):
        seen.append(outputs.shape[0])
        return float(np.mean(outputs.argmax(-1) == labels))

    report = sensitivity(model, _teacher_loader(model), metric=metric, config=PER_TENSOR, calib_batches=1,
                         eval_batches=2)
    assert (report.eval_batches, report.eval_samples, report.calib_batches) == (2, 2 * BATCH_SIZE, 1)
    assert seen == [2 * BATCH_SIZE] * (2 * 3 + 2)  # the documented cost: 2 passes per layer + 2
    assert report.metric_name == "metric"


def test_the_float_model_is_unchanged_by_ptq():
    model = _sabotaged_cnn()
    loader = _teacher_loader(model)
    before, outputs = _state(model), _logits(model, _images())
    sensitivity(model, loader, config=PER_TENSOR, calib_batches=2)
    _assert_same_state(before, model)
    assert list(iter_quanted_layers(model)) == []
    for a, b in zip(outputs, _logits(model, _images())):
        np.testing.assert_array_equal(a, b)


def test_the_qat_model_is_unchanged_and_keeps_its_training_flag():
    paddle.seed(1)
    model = QAT().quantize(TinyCNN())
    model.train()
    for x in _images(3):  # QAT state: observed scales
        model(paddle.to_tensor(x))
    before = _state(model)
    model.eval()
    outputs = _logits(model, _images())
    model.train()
    loader = [(x, np.zeros([BATCH_SIZE], "int64")) for x in _images()]
    report = sensitivity(model, loader, method="qat-state")
    assert model.training and all(layer.training for layer in model.sublayers())
    _assert_same_state(before, model)
    for a, b in zip(outputs, _logits(model, _images())):
        np.testing.assert_array_equal(a, b)
    assert sorted(report.ranking()) == ["conv1", "conv2", "fc"]


# ---------------------------------------------------------------------- residual blocks
class Block(nn.Layer):
    """``relu(conv2(relu(conv1(x))) + x)``: conv1 reads the identity, so the block quantizes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2D(8, 8, 3, padding=1)

    def forward(self, x):
        return nn.functional.relu(self.conv2(nn.functional.relu(self.conv1(x))) + x)


class ResNetlet(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2D(3, 8, 3, padding=1)
        self.block = Block()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.block(nn.functional.relu(self.stem(x)))  # an unsigned identity: the u8 grid
        return self.fc(paddle.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mse(outputs, labels):
    return float(np.mean((outputs - labels) ** 2))


def _residual_setup():
    paddle.seed(2)
    model = ResNetlet()
    images = _images()
    loader = list(zip(images, _logits(model, images)))  # labels: the float model's own logits
    return model, loader


def test_float_is_really_float_in_a_residual_block():
    model, loader = _residual_setup()
    quantized = PTQ().quantize(model)
    calibrate(quantized, loader, num_batches=2)
    assert residual_sites_of(quantized) != []  # the identity add reads a quantized input
    report = sensitivity(model, loader, metric=mse, mode="min", calib_batches=2)
    assert report.float_metric < 1e-10  # no quantizer on the identity either
    assert report.quantized_metric > 1e-6
    rows = {row.name: row for row in report.layers}
    assert sorted(rows) == ["block.conv1", "block.conv2", "fc", "stem"]
    for row in report.layers:  # mode 'min': positive = quantizing hurts
        assert row.drop_only_this == pytest.approx(row.only_this_quantized - report.float_metric)
        assert row.drop_only_this > 0
        assert row.gain_all_but_this == pytest.approx(report.quantized_metric - row.all_but_this_quantized)


def test_float_layers_compute_float_and_restore_the_quantized_forward():
    model, loader = _residual_setup()
    quantized = PTQ().quantize(model)
    calibrate(quantized, loader, num_batches=2)
    freeze(quantized)
    x = paddle.to_tensor(loader[0][0])
    with paddle.no_grad():
        q_out = quantized(x).numpy()
        with computing_float(quantized):
            f_out = quantized(x).numpy()
        after = quantized(x).numpy()
    np.testing.assert_allclose(f_out, loader[0][1], rtol=1e-5, atol=1e-6)
    assert np.abs(q_out - f_out).max() > 1e-4
    np.testing.assert_array_equal(after, q_out)
    assert not any(layer.compute_float for _, layer in iter_quanted_layers(quantized))


# ---------------------------------------------------------------------- outputs
class RecordingLogger(Logger):
    def __init__(self) -> None:
        self.calls = []

    def log_metrics(self, metrics, step):
        self.calls.append((dict(metrics), step))


def test_files_and_logger_receive_the_report(tmp_path):
    model = _sabotaged_cnn()
    logger = RecordingLogger()
    report = sensitivity(model, _teacher_loader(model), config=PER_TENSOR, calib_batches=2,
                         output_dir=tmp_path / "out", logger=logger)
    with open(tmp_path / "out" / "sensitivity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    assert [r["name"] for r in rows] == report.ranking() and [r["rank"] for r in rows] == ["1", "2", "3"]
    assert float(rows[0]["gain_all_but_this"]) == pytest.approx(report.layers[0].gain_all_but_this)
    data = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert data["format"] == "qtrainer-sensitivity" and data["method"] == "ptq"
    assert data["float_metric"] == report.float_metric
    assert [layer["name"] for layer in data["layers"]] == report.ranking()
    with Image.open(tmp_path / "out" / "sensitivity.png") as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    assert report.files["png"] == str(tmp_path / "out" / "sensitivity.png")
    [(metrics, step)] = logger.calls
    assert step == 0
    for row in report.layers:
        assert metrics[f"sensitivity/only_this/{row.name}"] == row.only_this_quantized
        assert metrics[f"sensitivity/all_but_this/{row.name}"] == row.all_but_this_quantized
    assert len(metrics) == 2 * 3 + 2


def test_an_infinite_sqnr_is_written_as_null(tmp_path):
    model = _sabotaged_cnn()
    report = sensitivity(model, _teacher_loader(model), config=PER_TENSOR, calib_batches=1, eval_batches=1)
    report.layers[0].weight_sqnr_db = math.inf
    data = json.loads(open(report.write_json(tmp_path / "r.json")).read())
    assert data["layers"][0]["weight_sqnr_db"] is None
    with open(report.write_csv(tmp_path / "r.csv"), newline="") as f:
        assert next(csv.DictReader(f))["weight_sqnr_db"] == ""


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small():
    model = _sabotaged_cnn()
    return model, _teacher_loader(model)[:2]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "qat"}, ValueError, r"unknown method 'qat'; use one of \['ptq', 'qat-state'\]"),
        ({"mode": "maximum"}, ValueError, r"mode='maximum'.*'max'.*'min'"),
        ({"calib_batches": 0}, ValueError, r"sensitivity\(calib_batches=0\): use a positive integer"),
        ({"calib_batches": 1.5}, ValueError, r"calib_batches=1.5.*positive integer"),
        ({"calib_batches": True}, ValueError, r"calib_batches=True"),
        ({"eval_batches": 0}, ValueError, r"eval_batches=0.*positive integer or None"),
        ({"eval_batches": -2}, ValueError, r"eval_batches=-2"),
        ({"metric": "accuracy"}, TypeError, r"metric must be a callable.*got str"),
        ({"mode": "min"}, ValueError, r"mode='min' needs a metric"),
        ({"metric": lambda o, l: float("nan")}, ValueError, r"returned nan with every layer quantized"),
        ({"metric": lambda o, l: "good"}, ValueError, r"returned str 'good'.*finite number"),
        ({"metric": lambda o, l: None}, ValueError, r"returned NoneType None"),
        ({"metric": lambda o, l: np.array([1.0, 2.0])}, ValueError, r"returned ndarray"),
        ({"config": "KLQuantizer"}, TypeError, r"config must be None, a dict of PTQ arguments"),
        ({"method": "qat-state"}, ValueError, r"has no quantized layer; use method='ptq'"),
        ({"logger": object()}, TypeError, r"logger must have a log_metrics"),
    ],
)
def test_bad_arguments_are_named(small, kwargs, error, match):
    model, loader = small
    with pytest.raises(error, match=match):
        sensitivity(model, loader, **{"calib_batches": 1, **kwargs})


def test_bad_loaders_are_named(small):
    model, loader = small
    with pytest.raises(ValueError, match=r"yielded no batch"):
        sensitivity(model, [])
    with pytest.raises(TypeError, match=r"re-iterable.*iterator"):
        sensitivity(model, iter(loader))
    with pytest.raises(TypeError, match=r"batch 0 is a ndarray.*\(images, labels\) pair"):
        sensitivity(model, [images for images, _ in loader])
    with pytest.raises(TypeError, match=r"loader must be an iterable.*got int"):
        sensitivity(model, 3)


def test_models_that_do_not_fit_the_method_are_named(small):
    model, loader = small
    with pytest.raises(ValueError, match=r"method='ptq'.*found no layer to quantize"):
        sensitivity(nn.Sequential(nn.Flatten(), nn.ReLU()), loader)
    quantized = QAT().quantize(copy.deepcopy(model))
    with pytest.raises(ValueError, match=r"already quantized.*method='qat-state'"):
        sensitivity(quantized, loader)
    with pytest.raises(ValueError, match=r"config applies to method='ptq' only"):
        sensitivity(quantized, loader, method="qat-state", config=PER_TENSOR)
    calibrating = PTQ().quantize(model)
    with pytest.raises(ValueError, match=r"still calibrating; freeze"):
        sensitivity(calibrating, loader, method="qat-state")
    with pytest.raises(TypeError, match=r"model must be a paddle.nn.Layer, got dict"):
        sensitivity({}, loader)
