"""Tests of qtrainer/quant/quanters/fused.py: the one-kernel weight path equals observe-then-fake-quant."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from qtrainer.quant.observers.absmax import AbsMaxObserver, MovingAverageAbsMaxObserver, PerChannelAbsMaxObserver
from qtrainer.quant.quanters.fake_quant import FakeQuanter
from qtrainer.quant.quanters.fused import FusedAbsMaxQuanter

from quant.quanters.test_fake_quant import _np_fake_quant, _rand


@pytest.mark.parametrize(
    "observer, axis, shape",
    [
        (lambda: PerChannelAbsMaxObserver(8, 0, 6), 0, (6, 3, 3, 3)),
        (lambda: PerChannelAbsMaxObserver(4, 1, 5), 1, (7, 5)),
        (lambda: AbsMaxObserver(8), None, (6, 3, 3, 3)),
    ],
)
def test_fused_weight_path_equals_observe_then_fake_quant(observer, axis, shape):
    w_np = _rand(shape, seed=15)
    fused, generic = FusedAbsMaxQuanter(observer(), observe="always"), FakeQuanter(observer(), observe="always")
    assert fused._fused is not None
    outs, grads = [], []
    for q in (fused, generic):
        w = paddle.to_tensor(w_np, stop_gradient=False)
        out = q(w)
        (out * out).sum().backward()
        outs.append(out.numpy())
        grads.append(w.grad.numpy())
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(fused.scale().numpy(), generic.scale().numpy())
    bits = fused.quant_bits
    expected_t = np.abs(w_np).max() if axis is None else np.abs(w_np).max(
        axis=tuple(d for d in range(w_np.ndim) if d != axis)
    )
    expected = _np_fake_quant(w_np, expected_t, bits, axis)
    np.testing.assert_allclose(outs[0], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("observer", [
    lambda: AbsMaxObserver(8, accumulate=True), lambda: MovingAverageAbsMaxObserver(8),
    lambda: PerChannelAbsMaxObserver(8, axis=2),
])
def test_fused_quanter_refuses_observers_it_cannot_fuse(observer):
    with pytest.raises(TypeError, match="use FakeQuanter"):
        FusedAbsMaxQuanter(observer())


def test_fused_quanter_writes_its_abs_max_through_the_observer():
    quanter = FusedAbsMaxQuanter(PerChannelAbsMaxObserver(8, 0))  # buffer allocated at the first call
    w = np.arange(12, dtype="float32").reshape(3, 4) - 5.0
    quanter(paddle.to_tensor(w))
    np.testing.assert_array_equal(quanter.observer.absmax.numpy(), np.abs(w).max(axis=1))
    assert quanter.is_ready() and quanter.follows_input
