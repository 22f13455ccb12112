"""Tests of qtrainer/quant/export/plan.py: the working copy and the per-layer decisions."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant import QAT, iter_quanted_layers
from qtrainer.quant.export.layers import FrozenActQuanter
from qtrainer.quant.export.plan import matches, observe_layers, plan_layers, working_copy


def _trained_net():
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(1, 4, 3), nn.ReLU(), nn.Conv2D(4, 4, 3))
    QAT().quantize(net)
    net.train()
    net(paddle.randn([2, 1, 8, 8]))
    return net


def test_matches_is_fnmatch_on_layer_names():
    assert matches("features.0", ["features.*"]) and not matches("head", ["features.*"])


def test_working_copy_freezes_activation_thresholds_and_leaves_the_model_alone():
    net = _trained_net()
    work = working_copy(net)
    layers = dict(iter_quanted_layers(work))
    assert all(isinstance(layer.act_quanter, FrozenActQuanter) for layer in layers.values())
    assert not work.training and net.training


def test_working_copy_refuses_layers_that_saw_no_data():
    net = nn.Sequential(nn.Conv2D(1, 4, 3))
    QAT().quantize(net)
    with pytest.raises(ValueError, match="have seen no data"):
        working_copy(net)


def test_unsigned_inputs_get_the_u8_scale_and_signed_ones_the_s8_scale():
    work = working_copy(_trained_net())
    quanted = dict(iter_quanted_layers(work))
    batch = [np.random.RandomState(0).standard_normal((2, 1, 8, 8)).astype("float32")]
    observed, _ = observe_layers(work, quanted, [batch])
    plans, weights = plan_layers(quanted, observed, keep_float=[], clip_activations="auto")
    first, second = plans["0"], plans["2"]
    assert first.act_signed and first.deploy_act_scale == pytest.approx(first.act_scale)
    assert not second.act_signed and second.deploy_act_scale == pytest.approx(second.act_scale * 255 / 127)
    assert weights["0"].dtype == np.int8 and first.export == "int8"
