"""Tests of qtrainer/quant/diagnostics/log_stats.py: the statistics reach a trainer's log methods."""
from __future__ import annotations

import paddle
from paddle import nn

from qtrainer.quant import QAT
from qtrainer.quant.diagnostics.log_stats import log_quant_stats


class _Sink:
    def __init__(self):
        self.metrics, self.histograms = [], []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((dict(metrics), step))

    def log_histogram(self, tag, values, step=None):
        self.histograms.append((tag, step))


def test_scalars_and_weight_scale_histograms_are_logged_at_the_step():
    net = nn.Sequential(nn.Conv2D(1, 4, 3))
    QAT().quantize(net)
    net.train()
    net(paddle.randn([2, 1, 6, 6]))
    sink = _Sink()
    scalars = log_quant_stats(sink, net, step=7)
    assert sink.metrics == [(scalars, 7)] and "quant/0/act_scale" in scalars
    assert sink.histograms and all(step == 7 for _, step in sink.histograms)
