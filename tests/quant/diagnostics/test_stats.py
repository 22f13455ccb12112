"""collect_quant_stats / flatten_for_logging: the numbers against NumPy, the tags."""
from __future__ import annotations

import math

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant.diagnostics.stats import (
    collect_quant_stats, flatten_for_logging, record_activation_clipping, split_stat_tag, stat_tag,
)
from qtrainer.quant.transforms.wrap import quantize_model


def _net():
    paddle.seed(0)
    return nn.Sequential(nn.Conv2D(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def _x(seed=0):
    rng = np.random.default_rng(seed)
    return paddle.to_tensor((rng.standard_normal((2, 3, 5, 5)) * 2).astype("float32"))


def _sqnr(w, q):
    return 10 * math.log10(np.sum(w.astype(np.float64) ** 2) / np.sum((w.astype(np.float64) - q) ** 2))


def test_stats_match_numpy():
    net = _net()
    quantize_model(net, {})
    net.train()
    x = _x()
    net(x)
    stats = collect_quant_stats(net)
    assert list(stats) == ["0", "3"]
    conv = stats["0"]
    assert conv["layer_type"] == "Conv2D" and conv["act_bits"] == 8
    assert conv["act_scale"] == pytest.approx(float(np.abs(x.numpy()).max()), rel=1e-6)
    w = net[0].weight.numpy()
    np.testing.assert_allclose(conv["weight_scale"], np.abs(w).max(axis=(1, 2, 3)), rtol=1e-6)
    assert conv["weight_clip_fraction"] == 0.0
    t = np.abs(w).max(axis=(1, 2, 3)).reshape(-1, 1, 1, 1)
    q = np.round(w / t * 127) * t / 127
    assert conv["weight_sqnr_db"] == pytest.approx(_sqnr(w, q), abs=0.05)
    assert conv["act_clip_fraction"] is None
    assert stats["3"]["weight_scale"].shape == (3,)  # Linear: one scale per output


def test_fewer_bits_give_a_lower_sqnr():
    sqnr = {}
    for bits in (4, 8):
        net = _net()
        quantize_model(net, {"weight_bits": bits})
        sqnr[bits] = collect_quant_stats(net)["0"]["weight_sqnr_db"]
    assert sqnr[8] > sqnr[4] + 15  # about 6 dB per bit


def test_unobserved_activation_scale_is_none():
    net = _net()
    quantize_model(net, {})
    assert collect_quant_stats(net)["0"]["act_scale"] is None


def test_activation_clip_fraction_only_when_recording():
    net = _net()
    quantize_model(net, {})
    net.train()
    net(_x(0))
    net.eval()
    assert record_activation_clipping(net, True) == 2
    x = _x(1) * 3
    net(x)
    frac = collect_quant_stats(net)["0"]["act_clip_fraction"]
    scale = collect_quant_stats(net)["0"]["act_scale"]
    assert frac == pytest.approx(float(np.mean(np.abs(x.numpy()) > scale)))
    assert 0 < frac < 1
    assert record_activation_clipping(net, False) == 2
    assert record_activation_clipping(net, False) == 0


def test_pact_alphas_and_clipped_weights():
    net = _net()
    quantize_model(
        net, {"activation_preprocess_type": "PACT", "pact_init": 1.5, "weight_preprocess_type": "PACT"}
    )
    with paddle.no_grad():  # clip the conv weight harder than its abs max
        net[0].weight_preprocess.alpha.set_value(paddle.to_tensor([0.1]))
    record_activation_clipping(net, True)
    net.train()
    x = _x(2)
    net(x)
    stats = collect_quant_stats(net)["0"]
    assert stats["act_pact_alpha"] == pytest.approx(1.5)
    assert stats["act_scale"] == pytest.approx(1.5)
    assert stats["weight_pact_alpha"] == pytest.approx(0.1)
    assert stats["act_clip_fraction"] == pytest.approx(float(np.mean(np.abs(x.numpy()) > 1.5)))
    w = net[0].weight.numpy()
    assert stats["weight_clip_fraction"] == pytest.approx(float(np.mean(np.abs(w) > 0.1)), abs=1e-6)


def test_flatten_for_logging_tags():
    net = _net()
    quantize_model(net, {"weight_quantize_type": "abs_max"})
    net.train()
    net(_x())
    record_activation_clipping(net, True)
    net(_x(1))
    stats = collect_quant_stats(net)
    scalars, hists = flatten_for_logging(stats)
    assert scalars["quant/act_scale/0"] == pytest.approx(stats["0"]["act_scale"])
    assert "quant/weight_scale/0" in scalars  # per tensor: one value, a scalar
    assert not hists
    assert "quant/act_bits/0" not in scalars and "quant/layer_type/0" not in scalars
    assert scalars["quant/summary/min_weight_sqnr_db"] == pytest.approx(
        min(s["weight_sqnr_db"] for s in stats.values())
    )
    assert "quant/summary/mean_act_clip_fraction" in scalars
    assert all(isinstance(v, float) for v in scalars.values())


def test_channel_wise_scales_become_histograms_and_none_is_left_out():
    net = _net()
    quantize_model(net, {})
    scalars, hists = flatten_for_logging(collect_quant_stats(net), prefix="q")
    expected = np.abs(net[0].weight.numpy()).max(axis=(1, 2, 3))
    np.testing.assert_allclose(hists["q/weight_scale/0"], expected)
    assert "q/act_scale/0" not in scalars  # nothing observed yet
    assert all(k.startswith("q/") for k in list(scalars) + list(hists))


def test_tags_are_grouped_by_statistic_then_layer():
    net = _net()
    quantize_model(net, {})
    net(_x())
    scalars, hists = flatten_for_logging(collect_quant_stats(net))
    per_layer = [tag for tag in [*scalars, *hists] if not tag.startswith("quant/summary/")]
    assert per_layer and all(split_stat_tag(tag) is not None for tag in per_layer)
    assert {split_stat_tag(tag)[1] for tag in per_layer} == {"0", "3"}
    assert "quant/weight_sqnr_db/3" in scalars and "quant/weight_scale/3" in hists


@pytest.mark.parametrize("tag, prefix, expected", [
    ("quant/act_scale/net.0", "quant", ("act_scale", "net.0")),
    ("quant/act_scale/block/conv", "quant", ("act_scale", "block/conv")),
    ("a/b/weight_sqnr_db/0", "a/b", ("weight_sqnr_db", "0")),
    ("quant/summary/min_weight_sqnr_db", "quant", None),
    ("quant/act_scale", "quant", None),
    ("quantized/act_scale/0", "quant", None),
    ("loss", "quant", None),
])
def test_split_stat_tag(tag, prefix, expected):
    assert split_stat_tag(tag, prefix) == expected
    if expected is not None:
        assert stat_tag(*expected, prefix=prefix) == tag
