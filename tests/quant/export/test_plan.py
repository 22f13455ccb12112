"""Tests of qtrainer/quant/export/plan.py: the working copy and the per-layer decisions."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant import QAT, iter_quanted_layers
from qtrainer.quant.export.layers import FrozenActQuanter
from qtrainer.quant.export.plan import CLIP_FRACTION, matches, observe_layers, plan_layers, working_copy


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
    plans, weights = plan_layers(quanted, observed, keep_float=[], clip_activations="auto", target="portable")
    first, second = plans["0"], plans["2"]
    assert first.act_signed and first.deploy_act_scale == pytest.approx(first.act_scale)
    assert not second.act_signed and second.deploy_act_scale == pytest.approx(second.act_scale * 255 / 127)
    assert weights["0"].dtype == np.int8 and first.export == "int8"


class _Block(nn.Layer):
    """``relu(conv2(relu(conv1(x))) + x)``: conv1 reads the identity, which the block quantizes for it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2D(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2D(4, 4, 3, padding=1)

    def forward(self, x):
        return nn.functional.relu(self.conv2(nn.functional.relu(self.conv1(x))) + x)


def _plans_for(target: str, act_bits: int = 8):
    paddle.seed(0)
    net = nn.Sequential(nn.Conv2D(1, 4, 3), nn.ReLU(), nn.Conv2D(4, 4, 3), nn.ReLU(), _Block())
    QAT({"activation_bits": act_bits}).quantize(net)
    net.train()
    net(paddle.randn([2, 1, 10, 10]))
    work = working_copy(net)
    quanted = dict(iter_quanted_layers(work))
    assert quanted["4.conv1"].input_quantized_outside  # the residual block's input
    batch = [np.random.RandomState(0).standard_normal((2, 1, 10, 10)).astype("float32")]
    observed, _ = observe_layers(work, quanted, [batch])
    return plan_layers(quanted, observed, keep_float=[], clip_activations="auto", target=target)[0]


@pytest.mark.parametrize("target, factor", [("vnni", 1.0), ("avx2", 255 / 127), ("portable", 255 / 127)])
def test_only_a_vnni_target_puts_unsigned_8_bit_inputs_on_the_full_u8_grid(target, factor):
    plans = _plans_for(target)
    signed, unsigned = plans["0"], plans["2"]
    assert signed.act_signed and not unsigned.act_signed
    assert signed.deploy_act_scale == pytest.approx(signed.act_scale)  # s8 does not depend on the target
    assert unsigned.deploy_act_scale == pytest.approx(unsigned.act_scale * factor)


@pytest.mark.parametrize("target", ["vnni", "portable"])
def test_low_bit_and_residual_inputs_keep_their_simulated_grid_on_every_target(target):
    four_bit = _plans_for(target, act_bits=4)["2"]
    assert four_bit.deploy_act_scale == pytest.approx(four_bit.act_scale * 255 / 7)  # codes 0..7 as simulated
    residual = _plans_for(target)["4.conv1"]
    assert not residual.act_signed
    assert residual.deploy_act_scale == pytest.approx(residual.act_scale * 255 / 127)  # the block's u8 grid


def _plans_with_thresholds(thresholds: dict[str, float], target: str, clip="auto"):
    work = working_copy(_trained_net())
    quanted = dict(iter_quanted_layers(work))
    for name, threshold in thresholds.items():
        quanted[name].act_quanter = FrozenActQuanter(threshold, 8)
    batch = [np.random.RandomState(0).standard_normal((2, 1, 8, 8)).astype("float32")]
    observed, _ = observe_layers(work, quanted, [batch])
    return plan_layers(quanted, observed, keep_float=[], clip_activations=clip, target=target)[0]


@pytest.mark.parametrize("target", ["portable", "vnni"])
def test_auto_clips_inputs_the_deployed_grid_would_keep_beyond_the_threshold(target):
    """'auto' clips where the simulation clips and the deployed grid would not: a signed input below
    -T (s8 reaches -128), an unsigned one above T on the u8 headroom grid (codes reach 2T); a VNNI
    target's full u8 grid clips at T itself. Thresholds above every input clip nothing."""
    tight = _plans_with_thresholds({"0": 0.5, "2": 1e-3}, target)
    signed, unsigned = tight["0"], tight["2"]
    assert signed.act_signed and signed.input_min < -0.5 and signed.above_threshold > CLIP_FRACTION
    assert not unsigned.act_signed and unsigned.above_threshold > CLIP_FRACTION
    assert signed.act_clip
    assert unsigned.act_clip == (target != "vnni")
    loose = _plans_with_thresholds({"0": 1e3, "2": 1e3}, target)
    assert loose["0"].above_threshold == loose["2"].above_threshold == 0.0
    assert not loose["0"].act_clip and not loose["2"].act_clip
    never = _plans_with_thresholds({"0": 0.5, "2": 1e-3}, target, clip=False)
    assert not never["0"].act_clip and not never["2"].act_clip
