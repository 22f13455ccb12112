"""The export's speed check: int8 against the same model in float, measured, and its warning."""
from __future__ import annotations

import json

import numpy as np
import paddle
from paddle import nn

from qtrainer.quant.export import export_quantized_model
from qtrainer.quant.export.isa import int8_isa
from qtrainer.quant.export.speed import slow_int8_warning
from qtrainer.quant.methods.qat import QAT


def _quantized_net():
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2D(16, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(16, 10))
    QAT().quantize(net)
    batches = [np.random.RandomState(i).rand(8, 3, 32, 32).astype("float32") for i in range(2)]
    net.train()
    with paddle.no_grad():
        for b in batches:
            net(paddle.to_tensor(b))
    net.eval()
    return net, batches


def test_the_report_has_both_latencies_measured_here(tmp_path):
    net, batches = _quantized_net()
    report = export_quantized_model(net, str(tmp_path / "m"), sample_inputs=batches)
    speed = json.load(open(tmp_path / "m.quant.json"))["speed"]
    assert speed == report.speed
    assert speed["batch"] == 1 and speed["num_threads"] == 1 and speed["rounds"] >= 3
    assert speed["fp32_ms"] > 0 and speed["int8_ms"] > 0 and speed["int8_isa"] == int8_isa()
    assert abs(speed["speedup"] - speed["fp32_ms"] / speed["int8_ms"]) < 0.01 * speed["speedup"] + 1e-3
    assert "speed on this machine" in report.summary()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the float model was staged only
    off = export_quantized_model(net, str(tmp_path / "off"), sample_inputs=batches, measure_speed=False)
    assert off.speed is None


def test_the_warning_names_what_keeps_int8_slow():
    speed = {"speedup": 0.8, "int8_ms": 5.0, "fp32_ms": 4.0, "batch": 1, "num_threads": 1, "int8_isa": "avx2"}
    text = slow_int8_warning(speed, ["features.0"], ["layer4.1.conv2"])
    assert "x0.80" in text and "features.0" in text and "layer4.1.conv2" in text and "avx2" in text
    assert slow_int8_warning({**speed, "speedup": 1.5}, ["a"], []) is None
    assert "every layer is int8" in slow_int8_warning(speed, [], [])
