"""fake_quant values and straight-through gradients; FakeQuanter's observe/quantize switches."""
from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

from qtrainer.quant.observers.absmax import (
    AbsMaxObserver,
    MovingAverageAbsMaxObserver,
    PerChannelAbsMaxObserver,
)
from qtrainer.quant.quanters.fake_quant import (
    FakeQuanter,
    _fake_quant_plain,
    fake_quant,
    fake_quant_reference,
    snap_to_int8_grid,
)


def _np_fake_quant(x, t, bits, axis=None):
    qmax = np.float32(2 ** (bits - 1) - 1)
    t = np.asarray(t, dtype=np.float32)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        t = t.reshape(shape)
    return np.round(np.clip(x * (qmax / t), -qmax, qmax)) * (t / qmax)


def _rand(shape, seed=0, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype("float32")


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_per_tensor_values_match_numpy(bits):
    x = _rand((3, 4, 5, 5), seed=bits)
    t = np.float32(1.7)
    out = fake_quant(paddle.to_tensor(x), paddle.to_tensor([t]), bits)
    np.testing.assert_allclose(out.numpy(), _np_fake_quant(x, t, bits), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [4, 8])
def test_error_bound_inside_the_range_and_saturation_outside(bits):
    x = _rand((10000,), seed=1)
    t = 1.5
    qmax = 2 ** (bits - 1) - 1
    out = fake_quant(paddle.to_tensor(x), paddle.to_tensor([t]), bits).numpy()
    inside = np.abs(x) <= t
    assert inside.any() and (~inside).any()
    err = np.abs(x[inside] - out[inside])
    assert err.max() <= t / (2 * qmax) * (1 + 1e-5)
    np.testing.assert_allclose(out[~inside], np.sign(x[~inside]) * t, rtol=1e-6)
    # only qmax * 2 + 1 distinct levels
    assert len(np.unique(np.round(out / (t / qmax)))) <= 2 * qmax + 1


def test_per_channel_conv_axis_0_and_linear_axis_1_match_numpy():
    w_conv = _rand((6, 3, 3, 3), seed=2)
    t_conv = np.abs(w_conv).max(axis=(1, 2, 3)) * 0.8  # some values clip
    out = fake_quant(paddle.to_tensor(w_conv), paddle.to_tensor(t_conv), 8, axis=0)
    np.testing.assert_allclose(out.numpy(), _np_fake_quant(w_conv, t_conv, 8, 0), rtol=1e-6, atol=1e-7)

    w_lin = _rand((7, 5), seed=3)
    t_lin = np.abs(w_lin).max(axis=0)
    out = fake_quant(paddle.to_tensor(w_lin), paddle.to_tensor(t_lin), 8, axis=1)
    np.testing.assert_allclose(out.numpy(), _np_fake_quant(w_lin, t_lin, 8, 1), rtol=1e-6, atol=1e-7)
    # every channel reaches its own threshold exactly once saturated
    np.testing.assert_allclose(np.abs(out.numpy()).max(axis=0), t_lin, rtol=1e-6)


def test_reference_and_traceable_paths_agree_with_the_fast_path():
    x = paddle.to_tensor(_rand((4, 6), seed=4))
    t = paddle.to_tensor(np.full([6], 1.1, dtype="float32"))
    for axis, thr in ((None, t[:1]), (1, t)):
        fast = fake_quant(x, thr, 6, axis).numpy()
        np.testing.assert_array_equal(fake_quant_reference(x, thr, 6, axis).numpy(), fast)
        np.testing.assert_array_equal(_fake_quant_plain(x, thr, 6, axis).numpy(), fast)


def _grad(x_np, thr, axis=None, in_range=False):
    x = paddle.to_tensor(x_np, stop_gradient=False)
    out = fake_quant(x, paddle.to_tensor(thr), 8, axis, in_range=in_range)
    (out * paddle.to_tensor(np.arange(out.size, dtype="float32").reshape(out.shape))).sum().backward()
    return x.grad.numpy()


def test_per_tensor_gradient_passes_inside_and_is_zero_outside():
    x = np.array([-3.0, -1.5, -0.2, 0.0, 0.7, 1.5, 2.9], dtype="float32")
    g = _grad(x, np.array([1.5], dtype="float32"))
    upstream = np.arange(x.size, dtype="float32")
    np.testing.assert_array_equal(g, np.where(np.abs(x) <= 1.5, upstream, 0.0))


def test_per_channel_gradient_mask_uses_each_channels_threshold():
    x = np.array([[2.0, 0.5], [0.5, 2.0]], dtype="float32")  # Linear weight [in, out], axis 1
    g = _grad(x, np.array([1.0, 3.0], dtype="float32"), axis=1)
    upstream = np.arange(4, dtype="float32").reshape(2, 2)
    np.testing.assert_array_equal(g, upstream * np.array([[0, 1], [1, 1]], dtype="float32"))


def test_in_range_skips_the_mask():
    x = _rand((3, 4), seed=5)
    t = np.abs(x).max(axis=0)
    np.testing.assert_array_equal(_grad(x, t, axis=1, in_range=True), _grad(x, t, axis=1))


def test_no_gradient_reaches_the_threshold():
    x = paddle.to_tensor(_rand((8,), seed=6), stop_gradient=False)
    t = paddle.to_tensor([0.5], stop_gradient=False)
    fake_quant(x, t, 8).sum().backward()
    assert t.grad is None or float(np.abs(t.grad.numpy()).sum()) == 0.0


# ---------------------------------------------------------------------------- FakeQuanter
def _moving_quanter(**kw):
    return FakeQuanter(MovingAverageAbsMaxObserver(8, 0.9), **kw)


def test_training_observes_and_quantizes_eval_freezes():
    q = _moving_quanter()
    a, b = _rand((4, 4), seed=7), _rand((4, 4), seed=8, scale=5.0)
    q.train()
    out = q(paddle.to_tensor(a))
    np.testing.assert_allclose(out.numpy(), _np_fake_quant(a, np.abs(a).max(), 8), rtol=1e-6, atol=1e-7)
    state = {k: v.numpy().copy() for k, v in q.state_dict().items()}
    q.eval()
    out = q(paddle.to_tensor(b))  # frozen: quantized with a's scale, b clipped
    np.testing.assert_allclose(out.numpy(), _np_fake_quant(b, np.abs(a).max(), 8), rtol=1e-6, atol=1e-7)
    for k, v in q.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k])


def test_calibration_mode_observes_in_eval_without_quantizing():
    q = _moving_quanter(observe="always", quantize=False)
    q.eval()
    x = _rand((5, 3), seed=9)
    out = q(paddle.to_tensor(x))
    np.testing.assert_array_equal(out.numpy(), x)
    np.testing.assert_allclose(q.scale().numpy(), [np.abs(x).max()], rtol=1e-6)


def test_never_mode_keeps_the_scale():
    q = _moving_quanter()
    q.train()
    q(paddle.to_tensor(_rand((4,), seed=10)))
    before = q.scale().numpy().copy()
    q.set_mode(observe="never")
    q(paddle.to_tensor(_rand((4,), seed=11, scale=50.0)))
    np.testing.assert_array_equal(q.scale().numpy(), before)


def test_unobserved_quanter_in_eval_observes_once_and_warns(caplog):
    q = _moving_quanter()
    q.eval()
    x = _rand((6,), seed=12)
    with caplog.at_level(logging.WARNING, logger="qtrainer.quant.quanters.fake_quant"):
        out = q(paddle.to_tensor(x))
    assert "before its observer saw any tensor" in caplog.text
    np.testing.assert_allclose(out.numpy(), _np_fake_quant(x, np.abs(x).max(), 8), rtol=1e-6, atol=1e-7)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qtrainer.quant.quanters.fake_quant"):
        q(paddle.to_tensor(x * 3))
    assert caplog.text == ""
    np.testing.assert_allclose(q.scale().numpy(), [np.abs(x).max()], rtol=1e-6)


def test_a_loaded_state_counts_as_observed():
    src = _moving_quanter()
    src.train()
    src(paddle.to_tensor(_rand((4,), seed=13)))
    dst = _moving_quanter()
    dst.set_state_dict(src.state_dict())
    dst.eval()
    x = _rand((4,), seed=14, scale=9.0)
    src.eval()
    np.testing.assert_array_equal(dst(paddle.to_tensor(x)).numpy(), src(paddle.to_tensor(x)).numpy())


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("observer", ["per_tensor", "per_channel"])
def test_low_bit_weights_use_the_int8_levels_paddle_deploys(bits, observer):
    """Below 8 bits an int8-grid weight quanter outputs round(k * 127 / qmax) * T / 127 (what
    Paddle's int8 kernels hold after re-quantizing with the channel's abs max), with an identity gradient."""
    obs = AbsMaxObserver(bits) if observer == "per_tensor" else PerChannelAbsMaxObserver(bits, 0, 6)
    quanter = FakeQuanter(obs, observe="always", int8_grid=True)
    x = paddle.to_tensor(_rand((6, 3, 3, 3), seed=bits), stop_gradient=False)
    out = quanter(x)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.ones_like(x.numpy()))
    axis = None if observer == "per_tensor" else 0
    t = np.abs(x.numpy()).max() if axis is None else np.abs(x.numpy()).reshape(6, -1).max(1)
    qmax = 2 ** (bits - 1) - 1
    uniform = _np_fake_quant(x.numpy(), t, bits, axis)
    tb = np.asarray(t, "float32").reshape([-1, 1, 1, 1] if axis == 0 else [1])
    expected = np.round(np.round(uniform / tb * qmax) * 127 / qmax) * tb / 127
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert np.abs(out.numpy() - uniform).max() <= tb.max() / 254 * 1.0001  # within half an int8 step
    # the same levels through the export's path and the standalone function
    np.testing.assert_allclose(quanter.quantize_with(x, quanter.scale()).numpy(), expected, rtol=1e-6, atol=1e-7)
    snapped = snap_to_int8_grid(paddle.to_tensor(uniform), paddle.to_tensor(np.asarray(t, "float32").reshape([-1])), axis)
    np.testing.assert_allclose(snapped.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_int8_grid_is_a_no_op_at_8_bits():
    quanter = FakeQuanter(PerChannelAbsMaxObserver(8, 0, 6), observe="always", int8_grid=True)
    assert not quanter.int8_grid
    x = paddle.to_tensor(_rand((6, 4)))
    np.testing.assert_allclose(quanter(x).numpy(), _np_fake_quant(x.numpy(), np.abs(x.numpy()).max(1), 8, 0), rtol=1e-6)


def test_record_clipping_stores_the_fraction_beyond_the_threshold():
    q = _moving_quanter()
    q.train()
    q(paddle.to_tensor(np.ones([10], dtype="float32")))  # scale 1
    q.eval()
    assert q.last_clip_fraction is None
    q.record_clipping = True
    x = np.array([0.5, 2.0, -3.0, 0.1], dtype="float32")
    q(paddle.to_tensor(x))
    assert float(q.last_clip_fraction) == pytest.approx(0.5)


def test_bad_mode_and_bad_observer():
    with pytest.raises(ValueError, match="observe="):
        _moving_quanter(observe="sometimes")
    with pytest.raises(TypeError, match="Observer"):
        FakeQuanter(paddle.nn.Identity())


def test_the_quanter_protocol_switches_and_reports_the_modes():
    quanter = FakeQuanter(AbsMaxObserver(8), observe="always", quantize=False)
    assert quanter.observing and not quanter.quantizing and not quanter.is_ready()
    quanter.observe(paddle.to_tensor(np.array([1.0, -4.0], "float32")))
    assert quanter.is_ready() and float(quanter.scale().numpy()[0]) == 4.0
    assert quanter.follows_input  # a last-seen abs max observed at every forward
    quanter.freeze()
    assert (quanter.observe_mode, quanter.quantize_enabled) == ("never", True)
    assert not quanter.observing and quanter.quantizing and not quanter.follows_input
    quanter.observe(paddle.to_tensor(np.array([9.0], "float32")))  # frozen: the scale stays
    assert float(quanter.scale().numpy()[0]) == 4.0
    quanter.enable_observer(True).enable_quant(False)
    assert quanter.observe_mode == "always" and not quanter.quantize_enabled
