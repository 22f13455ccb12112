"""Empirical PTQ bias correction: the quantized layers' mean outputs match the float model's again."""
from __future__ import annotations

import copy

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant.methods.bias_correction import correct_bias
from qtrainer.quant.methods.ptq import PTQ, calibrate
from qtrainer.quant.transforms.wrap import computing_float, iter_quanted_layers


def _depthwise_net(bias: bool = True) -> nn.Layer:
    """Depthwise convolutions: 9 weights per output channel, the case bias correction is for."""
    paddle.seed(0)
    return nn.Sequential(
        nn.Conv2D(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2D(8, 8, 3, padding=1, groups=8, bias_attr=None if bias else False), nn.ReLU(),
        nn.Conv2D(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 5),
    )


def _batches(seed: int, count: int = 4) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.rand(16, 3, 8, 8).astype("float32") for _ in range(count)]


def _frozen_ptq(net: nn.Layer, weight_bits: int = 4) -> tuple[PTQ, nn.Layer]:
    ptq = PTQ(activation_quantizer="AbsmaxQuantizer", weight_bits=weight_bits)
    model = ptq.quantize(net)
    calibrate(model, [paddle.to_tensor(b) for b in _batches(0)])
    ptq.freeze(model)
    return ptq, model


def _channel_means(model: nn.Layer, name: str, batches, float_model: bool = False) -> np.ndarray:
    layer = dict(iter_quanted_layers(model))[name]
    seen = []
    handle = layer.register_forward_post_hook(lambda _l, _i, out: seen.append(out.numpy().mean(axis=(0, 2, 3))))
    try:
        with paddle.no_grad():
            if float_model:
                with computing_float(model):
                    for b in batches:
                        model(paddle.to_tensor(b))
            else:
                for b in batches:
                    model(paddle.to_tensor(b))
    finally:
        handle.remove()
    return np.mean(seen, axis=0)


def _output_error(model: nn.Layer, reference: nn.Layer, batches) -> float:
    with paddle.no_grad():
        errors = [float(((model(paddle.to_tensor(b)) - reference(paddle.to_tensor(b))) ** 2).mean()) for b in batches]
    return float(np.mean(errors))


def test_each_layer_mean_output_matches_the_float_model_after_correction():
    _, model = _frozen_ptq(_depthwise_net())
    calibration = _batches(0)
    float_means = {n: _channel_means(model, n, calibration, float_model=True) for n in ("2", "4")}
    before = {n: _channel_means(model, n, calibration) - float_means[n] for n in float_means}
    result = correct_bias(model, calibration)
    assert set(result.corrected) == {"0", "2", "4", "7"} and not result.skipped
    for name in float_means:
        after = _channel_means(model, name, calibration) - float_means[name]
        assert np.abs(before[name]).max() > 1e-3  # 4-bit depthwise weights shift the mean
        assert np.abs(after).max() < 1e-4  # the float model's mean, given the corrected layers before


def test_correction_lowers_the_output_error_on_unseen_batches():
    net = _depthwise_net()
    _, plain = _frozen_ptq(copy.deepcopy(net))
    _, corrected = _frozen_ptq(copy.deepcopy(net))
    correct_bias(corrected, _batches(0))
    held_out = _batches(1)
    assert _output_error(corrected, net, held_out) < 0.8 * _output_error(plain, net, held_out)


def test_layers_without_bias_are_skipped_and_named():
    _, model = _frozen_ptq(_depthwise_net(bias=False))
    result = correct_bias(model, _batches(0))
    assert result.skipped == {"2": "no bias"} and "4" in result.corrected


def test_bad_input_is_refused_with_a_clear_message():
    ptq = PTQ(activation_quantizer="AbsmaxQuantizer")
    calibrating = ptq.quantize(_depthwise_net())
    with pytest.raises(ValueError, match="not frozen; calibrate and freeze"):
        correct_bias(calibrating, _batches(0))
    _, frozen = _frozen_ptq(_depthwise_net())
    with pytest.raises(ValueError, match="needs calibration data"):
        correct_bias(frozen, [])
    with pytest.raises(ValueError, match="has no quantized layer"):
        correct_bias(nn.Sequential(nn.Conv2D(3, 4, 3)), _batches(0))


def test_computing_float_gives_the_float_model_and_restores_quantization():
    net = _depthwise_net()
    _, model = _frozen_ptq(copy.deepcopy(net))
    x = paddle.to_tensor(_batches(2)[0])
    with paddle.no_grad():
        quantized = model(x).numpy()
        with computing_float(model):
            floated = model(x).numpy()
        again = model(x).numpy()
        reference = net(x).numpy()
    np.testing.assert_allclose(floated, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again, quantized)
    assert np.abs(quantized - reference).max() > 1e-3
    with pytest.raises(KeyError, match="no quantized layer named"):
        with computing_float(model, ["nope"]):
            pass


def test_the_pipeline_corrects_on_the_calibration_batches_when_asked():
    from qtrainer.quant.methods.ptq_pipeline import calibrate_and_freeze

    net = _depthwise_net()
    for enabled in (False, True):
        model = PTQ(activation_quantizer="AbsmaxQuantizer", weight_bits=4).quantize(copy.deepcopy(net))
        result = calibrate_and_freeze(model, [paddle.to_tensor(b) for b in _batches(0)], bias_correction=enabled,
                                      bias_batches=2)
        if enabled:
            assert result.bias_correction.batches == 2 and set(result.bias_correction.corrected) == {"0", "2", "4", "7"}
        else:
            assert result.bias_correction is None
    with pytest.raises(ValueError, match="bias_batches"):
        calibrate_and_freeze(PTQ().quantize(copy.deepcopy(net)), [_batches(0)[0]], bias_correction=True, bias_batches=0)
