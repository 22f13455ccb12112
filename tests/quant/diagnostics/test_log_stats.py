"""Tests of qtrainer/quant/diagnostics/log_stats.py: the statistics, their layout and their bar charts
reach a trainer's log methods."""
from __future__ import annotations

import re

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant import QAT
from qtrainer.quant.diagnostics.log_stats import (
    QuantStatsLog, log_quant_stats, per_layer_values, quant_charts, quant_layout,
)
from qtrainer.quant.diagnostics.stats import record_activation_clipping


class _Sink:
    """The trainer methods the statistics go through, recorded."""

    def __init__(self, is_global_zero=True):
        self.is_global_zero = is_global_zero
        self.metrics, self.histograms, self.layouts, self.images = [], [], [], []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_histogram(self, tag, values, step=None):
        self.histograms.append((tag, step))

    def log_layout(self, layout):
        self.layouts.append(layout)

    def log_image(self, tag, image, step=None):
        self.images.append((tag, image, step))


def _net():
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    QAT().quantize(net)
    net.train()
    net(paddle.randn([2, 1, 6, 6]))
    return net


def test_scalars_and_weight_scale_histograms_are_logged_at_the_step():
    net = _net()
    sink = _Sink()
    scalars = log_quant_stats(sink, net, step=7)
    assert sink.metrics == [(scalars, 7)] and "quant/act_scale/0" in scalars and "quant/act_scale/3" in scalars
    assert ("quant/weight_scale/0", 7) in sink.histograms  # channel-wise: one scale per output channel
    assert all(step == 7 for _, step in sink.histograms)


def test_layout_has_one_multiline_chart_per_statistic_matching_only_its_tags():
    tags = ["quant/act_threshold/net.0", "quant/act_threshold/net.4", "quant/act_threshold_kl/net.0",
            "quant/summary/min_weight_sqnr_db", "quant/summary/min_weight_sqnr_db_x", "loss", "quant_charts/act_scale"]
    layout = quant_layout(tags)
    assert list(layout) == ["quant", "quant/summary"]
    assert list(layout["quant"]) == ["act_threshold", "act_threshold_kl"]
    assert layout["quant"]["act_threshold"] == ["Multiline", ["quant/act_threshold/.*"]]
    assert list(layout["quant/summary"]) == ["min_weight_sqnr_db", "min_weight_sqnr_db_x"]  # one chart each
    for category, charts in layout.items():
        for title, (_, regexes) in charts.items():  # TensorBoard matches with re.match
            matched = [t for t in tags if any(re.match(r, t) for r in regexes)]
            expected = [f"quant/summary/{title}"] if category == "quant/summary" else \
                [t for t in tags if t.startswith(f"quant/{title}/")]
            assert matched == expected, title


def test_layout_is_empty_without_statistics():
    assert quant_layout(["loss", "val_acc", "quant"]) == {}


def test_per_layer_values_keep_the_layer_order():
    scalars = {"quant/act_scale/b": 2.0, "quant/weight_sqnr_db/b": 30.0, "quant/act_scale/a.1": 1.0,
               "quant/summary/mean_act_clip_fraction": 0.1}
    assert per_layer_values(scalars, "act_scale") == (["b", "a.1"], [2.0, 1.0])
    assert per_layer_values(scalars, "act_pact_alpha") == ([], [])


def test_charts_are_drawn_for_the_chart_statistics_present():
    scalars = {"quant/act_scale/0": 2.0, "quant/act_scale/3": 1.0, "quant/weight_sqnr_db/0": float("inf"),
               "quant/weight_pact_alpha/0": 3.0}
    charts = quant_charts(scalars)
    assert list(charts) == ["quant_charts/weight_sqnr_db", "quant_charts/act_scale"]
    image = charts["quant_charts/act_scale"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > charts["quant_charts/weight_sqnr_db"].shape[0]  # two bars against one


def test_the_layout_is_written_once_and_again_only_for_a_new_statistic():
    net = _net()
    sink = _Sink()
    stats_log = QuantStatsLog()
    stats_log.log(sink, net, step=1)
    stats_log.log(sink, net, step=2)
    assert len(sink.layouts) == 1
    first = sink.layouts[0]["quant"]
    assert "act_scale" in first and "weight_sqnr_db" in first and "act_clip_fraction" not in first
    assert "mean_act_clip_fraction" not in sink.layouts[0]["quant/summary"]
    record_activation_clipping(net, True)  # a statistic the layout lacks
    net(paddle.randn([2, 1, 6, 6]))
    stats_log.log(sink, net, step=3)
    assert len(sink.layouts) == 2
    second = sink.layouts[1]["quant"]
    assert list(second)[:len(first)] == list(first) and "act_clip_fraction" in second
    assert "mean_act_clip_fraction" in sink.layouts[1]["quant/summary"]
    stats_log.reset()  # a new run
    stats_log.log(sink, net, step=4)
    assert len(sink.layouts) == 3


def test_extra_scalars_are_logged_and_charted():
    net = _net()
    sink = _Sink()
    stats_log = QuantStatsLog()
    scalars = stats_log.log(sink, net, step=5, extra_scalars={"quant/output_sqnr_db/0": 20.0,
                                                              "quant/output_sqnr_db/3": -1.0})
    assert sink.metrics[-1] == ({"quant/output_sqnr_db/0": 20.0, "quant/output_sqnr_db/3": -1.0}, 5)
    assert "output_sqnr_db" in sink.layouts[0]["quant"]
    tags = stats_log.log_charts(sink, scalars, step=5)
    assert "quant_charts/output_sqnr_db" in tags and "quant_charts/weight_sqnr_db" in tags
    assert [tag for tag, _, _ in sink.images] == tags and all(step == 5 for _, _, step in sink.images)


def test_charts_are_not_drawn_on_other_ranks():
    sink = _Sink(is_global_zero=False)
    assert QuantStatsLog().log_charts(sink, {"quant/act_scale/0": 1.0}) == [] and sink.images == []


@pytest.mark.parametrize("stats", [("act_scale",), ()])
def test_chart_statistics_can_be_chosen(stats):
    sink = _Sink()
    tags = QuantStatsLog(chart_prefix="c", chart_stats=stats).log_charts(
        sink, {"quant/act_scale/0": 1.0, "quant/weight_sqnr_db/0": 9.0})
    assert tags == [f"c/{s}" for s in stats]
