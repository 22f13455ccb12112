"""quantize_model: which layers are wrapped, how they compute, their state, skips and errors."""
from __future__ import annotations

import copy
import logging
import re

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant.quanters.pact import PACT, PACTQuanter
from qtrainer.quant.quanters.fake_quant import FakeQuanter, fake_quant
from qtrainer.quant.transforms.wrap import (
    QuantedConv2D,
    QuantedLayer,
    QuantedLinear,
    iter_quanted_layers,
    quantize_model,
)


class TinyNet(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2D(8)
        self.dw = nn.Conv2D(8, 8, 3, padding=1, groups=8)
        self.gconv = nn.Conv2D(8, 8, 1, groups=2, bias_attr=False)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        x = nn.functional.relu(self.bn(self.conv(x)))
        x = nn.functional.relu(self.dw(x))
        x = self.pool(self.gconv(x)).flatten(1)
        return self.head(x)


QUANTIZABLE = ["conv", "dw", "gconv", "head.0", "head.2"]


def _net(seed=0):
    paddle.seed(seed)
    return TinyNet()


def _x(seed=0, n=4):
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype("float32"))


def _train(model, steps=3, lr=0.05, seed=0):
    opt = paddle.optimizer.SGD(learning_rate=lr, parameters=model.parameters())
    model.train()
    for i in range(steps):
        loss = (model(_x(seed + i)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.clear_grad()


def test_quantizable_layers_are_replaced_in_place():
    net = _net()
    result = quantize_model(net, {})
    assert [name for name, _ in result] == QUANTIZABLE
    assert isinstance(net.conv, QuantedConv2D) and isinstance(net.head[2], QuantedLinear)
    assert isinstance(net.bn, nn.BatchNorm2D)
    assert [name for name, _ in iter_quanted_layers(net)] == QUANTIZABLE


def test_float_parameters_keep_their_objects_and_state_dict_keys():
    net = _net()
    float_keys = set(net.state_dict())
    conv_weight = net.conv.weight
    quantize_model(net, {})
    assert net.conv.weight is conv_weight and net.conv.layer.weight is conv_weight
    keys = set(net.state_dict())
    assert float_keys <= keys
    assert all(".layer." not in k for k in keys)
    assert "conv.act_quanter.observer.accum" in keys
    assert "head.2.weight_quanter.observer.absmax" in keys
    param_ids = {id(p) for p in net.parameters()}
    assert id(conv_weight) in param_ids


def test_channel_axis_per_layer_type():
    net = _net()
    quantize_model(net, {})
    assert net.conv.weight_axis == 0 and net.dw.weight_axis == 0 and net.head[0].weight_axis == 1
    np.testing.assert_allclose(
        net.conv.weight_scale().numpy(), np.abs(net.conv.weight.numpy()).max(axis=(1, 2, 3))
    )
    np.testing.assert_allclose(
        net.head[0].weight_scale().numpy(), np.abs(net.head[0].weight.numpy()).max(axis=0)
    )
    assert list(net.head[0].weight_scale().shape) == [16]


def test_per_tensor_weights_with_abs_max():
    net = _net()
    quantize_model(net, {"weight_quantize_type": "abs_max"})
    assert net.conv.weight_axis is None
    np.testing.assert_allclose(net.conv.weight_scale().numpy(), [np.abs(net.conv.weight.numpy()).max()])


@pytest.mark.parametrize("bits, tol", [(8, 0.03), (16, 1e-3)])
def test_outputs_stay_close_to_float(bits, tol):
    ref = _net()
    net = _net()
    quantize_model(net, {"weight_bits": bits, "activation_bits": bits})
    net.eval()
    ref.eval()
    for _, layer in iter_quanted_layers(net):  # calibrate in eval mode (BatchNorm frozen)
        layer.act_quanter.set_mode(observe="always")
    net(_x(1))  # the moving average of one batch is its abs max: nothing clips below
    for _, layer in iter_quanted_layers(net):
        layer.act_quanter.set_mode(observe="train")
    a, b = net(_x(1)).numpy(), ref(_x(1)).numpy()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding="SAME", stride=2),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=2, dilation=2, groups=2),
        dict(padding=1, data_format="NHWC"),
    ],
)
def test_quanted_conv_computes_like_the_float_conv(kwargs):
    paddle.seed(1)
    conv = nn.Conv2D(4, 6, 3, **kwargs)
    net = nn.Sequential(conv)
    shape = (2, 7, 7, 4) if kwargs.get("data_format") == "NHWC" else (2, 4, 7, 7)
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal(shape).astype("float32"))
    expected = conv(x).numpy()
    quantize_model(net, {})
    q = net[0]
    q.act_quanter.set_mode(observe="never", quantize=False)
    q.weight_quanter.set_mode(observe="never", quantize=False)
    np.testing.assert_allclose(q(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_training_trains_the_float_weights():
    net = _net()
    quantize_model(net, {})
    before = net.conv.weight.numpy().copy()
    _train(net, steps=1)
    assert not np.allclose(net.conv.weight.numpy(), before)


def test_weight_scale_follows_the_current_weight():
    net = _net()
    quantize_model(net, {})
    _train(net, steps=2)  # the optimizer changed the weight after the last forward
    np.testing.assert_allclose(
        net.conv.weight_scale().numpy(), np.abs(net.conv.weight.numpy()).max(axis=(1, 2, 3))
    )
    q = net.conv.quantized_weight().numpy()
    assert q.shape == tuple(net.conv.weight.shape)
    np.testing.assert_allclose(np.abs(q).max(axis=(1, 2, 3)), net.conv.weight_scale().numpy(), rtol=1e-6)


def test_state_dict_round_trip_gives_identical_outputs_and_training():
    net = _net()
    quantize_model(net, {"activation_preprocess_type": "PACT", "pact_warmup_steps": 2})
    _train(net, steps=4)
    state = {k: v.numpy().copy() for k, v in net.state_dict().items()}

    fresh = _net(seed=99)  # different float weights: everything must come from the state
    quantize_model(fresh, {"activation_preprocess_type": "PACT", "pact_warmup_steps": 2})
    fresh.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)
    net.eval()
    fresh.eval()
    np.testing.assert_array_equal(fresh(_x(5)).numpy(), net(_x(5)).numpy())
    # and training continues identically (moving averages, PACT alpha, warm-up state)
    _train(net, steps=2, seed=10)
    _train(fresh, steps=2, seed=10)
    net.eval()
    fresh.eval()
    np.testing.assert_allclose(fresh(_x(6)).numpy(), net(_x(6)).numpy(), rtol=1e-6, atol=1e-6)


def test_pact_config_builds_pact_and_its_quanter():
    net = _net()
    quantize_model(net, {"activation_preprocess_type": "PACT", "pact_init": 3.0})
    layer = net.dw
    assert layer.act_pact and isinstance(layer.act_preprocess, PACT)
    assert isinstance(layer.act_quanter, PACTQuanter)
    np.testing.assert_allclose(layer.act_scale().numpy(), [3.0])
    x = paddle.nn.functional.relu(paddle.randn([2, 8, 6, 6]) * 4)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        fused = layer(x).numpy()
        w = layer.weight_quanter(layer.weight)
        unfused = nn.functional.conv2d(
            layer.act_quanter(layer.act_preprocess(x)), w, layer.bias, padding=1, groups=8
        )
        np.testing.assert_allclose(fused, unfused.numpy(), rtol=1e-5, atol=1e-5)


def test_weight_pact_starts_at_the_weight_abs_max():
    net = _net()
    quantize_model(net, {"weight_preprocess_type": "PACT"})
    assert net.conv.weight_pact
    np.testing.assert_allclose(
        net.conv.weight_preprocess.threshold().numpy(),
        [np.abs(net.conv.weight.numpy()).max()],
        rtol=1e-6,
    )
    _train(net, steps=1)  # trains without error, alpha is a parameter
    assert any(p is net.conv.weight_preprocess.alpha for p in net.parameters())


def test_abs_max_activations():
    net = _net()
    quantize_model(net, {"activation_quantize_type": "abs_max"})
    net.train()
    x = _x(3)
    net(x)
    np.testing.assert_allclose(net.conv.act_scale().numpy(), [np.abs(x.numpy()).max()], rtol=1e-6)


# ---------------------------------------------------------------------------- skipping
def test_skip_patterns_fnmatch_regex_and_containers():
    net = _net()
    result = quantize_model(net, {"skip_patterns": ["head", "re:g.*"]})
    assert [n for n, _ in result] == ["conv", "dw"]
    assert isinstance(net.head[0], nn.Linear) and isinstance(net.gconv, nn.Conv2D)


def test_skip_pattern_on_a_leaf():
    net = _net()
    result = quantize_model(net, {"skip_patterns": ["*.2", re.compile("dw")]})
    assert [n for n, _ in result] == ["conv", "gconv", "head.0"]


def test_skip_quant_attribute_on_a_layer_and_on_a_container():
    net = _net()
    net.conv.skip_quant = True
    net.head.skip_quant = True
    result = quantize_model(net, {})
    assert [n for n, _ in result] == ["dw", "gconv"]


def test_unused_skip_pattern_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="qtrainer.quant.transforms.wrap"):
        quantize_model(_net(), {"skip_patterns": ["no_such_layer"]})
    assert "no_such_layer" in caplog.text


def test_layer_types_can_be_restricted():
    result = quantize_model(_net(), {"quantizable_layer_type": ["Linear"]})
    assert [n for n, _ in result] == ["head.0", "head.2"]


def test_a_shared_layer_is_wrapped_once_and_replaced_everywhere():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    result = quantize_model(net, {})
    assert len(result) == 1
    assert net[0] is net[2] and isinstance(net[0], QuantedLinear)


def test_a_subclass_that_overrides_forward_is_left_in_float(caplog):
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(Scaled(4, 4), nn.Linear(4, 2))
    with caplog.at_level(logging.WARNING, logger="qtrainer.quant.transforms.wrap"):
        result = quantize_model(net, {})
    assert [n for n, _ in result] == ["1"]
    assert "overrides forward" in caplog.text


# ---------------------------------------------------------------------------- errors
def test_no_quantizable_layer_says_what_was_looked_for_and_found():
    net = nn.Sequential(nn.ReLU(), nn.BatchNorm1D(3))
    with pytest.raises(ValueError) as err:
        quantize_model(net, {})
    msg = str(err.value)
    assert "Conv2D" in msg and "Linear" in msg and "ReLU x1" in msg and "BatchNorm1D x1" in msg


def test_everything_skipped_is_reported():
    with pytest.raises(ValueError, match="skipped by skip_patterns"):
        quantize_model(_net(), {"skip_patterns": ["*"]})


def test_quantize_twice_is_an_error():
    net = _net()
    quantize_model(net, {})
    state = set(net.state_dict())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(net, {})
    assert set(net.state_dict()) == state


def test_a_root_layer_cannot_be_replaced():
    with pytest.raises(ValueError, match="container"):
        quantize_model(nn.Linear(3, 3), {})


@pytest.mark.parametrize("bad", [nn.Identity(), lambda x: x, object, int])
@pytest.mark.parametrize(
    "argument", ["weight_preprocess", "act_preprocess", "weight_quantize", "act_quantize"]
)
def test_user_classes_must_be_layer_subclasses(argument, bad):
    net = _net()
    with pytest.raises(TypeError, match=argument):
        quantize_model(net, {}, **{argument: bad})
    assert not list(iter_quanted_layers(net))  # nothing half-done


def test_not_a_layer():
    with pytest.raises(TypeError, match="paddle.nn.Layer"):
        quantize_model("model", {})


# ---------------------------------------------------------------------------- user classes
class RecordingQuanter(nn.Layer):
    def __init__(self, quant_bits=8, axis=None):
        super().__init__()
        self.quant_bits, self.axis = quant_bits, axis
        self.register_buffer("t", paddle.ones([1]), persistable=True)

    def forward(self, x):
        return fake_quant(x, self.t, self.quant_bits)

    def scale(self):
        return self.t


class NoScaleQuanter(nn.Layer):
    def forward(self, x):
        return x


class Halve(nn.Layer):
    def forward(self, x):
        return x * 0.5


def test_user_classes_receive_bits_and_axis_and_replace_the_defaults():
    net = _net()
    quantize_model(
        net,
        {"weight_bits": 4, "activation_bits": 6},
        weight_preprocess=Halve,
        act_preprocess=Halve,
        weight_quantize=RecordingQuanter,
        act_quantize=RecordingQuanter,
    )
    layer = net.head[0]
    assert isinstance(layer.weight_quanter, RecordingQuanter) and layer.weight_quanter.axis == 1
    assert layer.weight_quanter.quant_bits == 4 and layer.act_quanter.quant_bits == 6
    assert layer.act_quanter.axis is None and net.conv.weight_quanter.axis == 0
    assert layer.weight_bits == 4 and layer.act_bits == 6
    np.testing.assert_allclose(layer.effective_weight().numpy(), layer.weight.numpy() * 0.5)
    _train(net, steps=1)
    assert "head.0.weight_quanter.t" in net.state_dict()


def test_a_quanter_without_scale_cannot_give_its_scale():
    net = _net()
    quantize_model(net, {}, act_quantize=NoScaleQuanter)
    net(_x())
    with pytest.raises(TypeError, match="scale"):
        net.conv.act_scale()


def test_a_user_class_that_cannot_be_built_is_reported():
    class Needs(nn.Layer):
        def __init__(self, required):
            super().__init__()

    with pytest.raises(TypeError, match="Needs"):
        quantize_model(_net(), {}, act_preprocess=Needs)


def test_deepcopy_keeps_the_float_layer_tied_to_the_copy():
    net = _net()
    quantize_model(net, {})
    net(_x())
    clone = copy.deepcopy(net)
    assert clone.conv.layer.weight is clone.conv.weight
    assert clone.conv.weight is not net.conv.weight
    clone.eval()
    net.eval()
    np.testing.assert_array_equal(clone(_x(2)).numpy(), net(_x(2)).numpy())


def test_eval_model_can_be_traced_by_paddle_jit():
    net = _net()
    quantize_model(net, {})
    _train(net, steps=2)
    net.eval()
    x = _x(4)
    expected = net(x).numpy()
    static = paddle.jit.to_static(net, full_graph=True)
    np.testing.assert_allclose(static(x).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_quanted_layer_contract_attributes():
    net = _net()
    quantize_model(net, {})
    for _, layer in iter_quanted_layers(net):
        assert isinstance(layer, QuantedLayer)
        assert layer.layer_type in ("Conv2D", "Linear")
        assert layer.act_bits == 8 and layer.weight_bits == 8 and layer.act_axis is None
        assert not layer.act_pact and not layer.weight_pact
        assert isinstance(layer.act_quanter, FakeQuanter)


def test_quant_sync_modes_name_real_state_dict_keys():
    from qtrainer.quant.transforms.wrap import quant_sync_modes

    net = _net()
    quantize_model(net, {"activation_preprocess_type": "PACT"})
    modes = quant_sync_modes(net)
    keys = set(net.state_dict())
    assert modes and set(modes) <= keys
    assert modes["conv.act_preprocess.alpha"] == "mean"
    assert modes["conv.act_preprocess.observer.accum"] == "mean"
    assert modes["head.0.weight_quanter.observer.absmax"] == "max"
    assert not any(k.endswith(".weight") and "quanter" not in k for k in modes)


def test_only_the_pact_warm_up_leaves_parameters_unused_and_it_says_so():
    """What DataParallel needs: the layers whose parameters may go without a gradient declare it
    (``may_leave_parameters_unused``); every other parameter gets one in every step."""
    net = nn.Sequential(nn.Conv2D(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    quantize_model(net, {"activation_preprocess_type": "PACT", "pact_warmup_steps": 3})
    declaring = {name for name, layer in net.named_sublayers() if getattr(layer, "may_leave_parameters_unused", False)}
    assert declaring == {"0.act_preprocess", "3.act_preprocess"}
    net.train()
    for step in range(4):  # three warm-up steps, then a learned one
        net.clear_gradients()
        net(paddle.randn([2, 1, 6, 6])).sum().backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None]
        assert all(n.endswith("act_preprocess.alpha") for n in missing), f"step {step}: {missing}"
        assert bool(missing) == (step < 3), f"step {step}: {missing}"
