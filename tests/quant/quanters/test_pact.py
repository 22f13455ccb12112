"""PACT: its gradient equals the relu formula's, alpha trains, the warm-up, PACTQuanter."""
from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

from qtrainer.quant.quanters.pact import PACT, PACTQuanter, pact_clip, pact_fake_quant
from qtrainer.quant.quanters.fake_quant import fake_quant


def _data(shape=(4, 3, 6, 6), seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype("float32")


def _relu_form(x, alpha):
    return x - paddle.nn.functional.relu(x - alpha) + paddle.nn.functional.relu(-alpha - x)


def _grads(fn, x_np, alpha_value, upstream):
    x = paddle.to_tensor(x_np, stop_gradient=False)
    alpha = paddle.to_tensor([alpha_value], stop_gradient=False)
    out = fn(x, alpha)
    (out * paddle.to_tensor(upstream)).sum().backward()
    return out.numpy(), x.grad.numpy(), alpha.grad.numpy()


def test_pact_clip_equals_the_relu_formula_with_its_gradients():
    x = _data()
    up = _data(seed=1, scale=1.0)
    ours = _grads(pact_clip, x, 2.0, up)
    ref = _grads(_relu_form, x, 2.0, up)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert abs(ours[2][0]) > 0  # alpha does get a gradient


def test_alpha_gradient_is_the_signed_sum_over_clipped_values():
    x = np.array([-5.0, -1.0, 0.5, 3.0, 4.0], dtype="float32")
    up = np.array([10.0, 1.0, 1.0, 2.0, 3.0], dtype="float32")
    _, gx, ga = _grads(pact_clip, x, 2.0, up)
    assert ga[0] == pytest.approx(2.0 + 3.0 - 10.0)
    np.testing.assert_array_equal(gx, [0.0, 1.0, 1.0, 0.0, 0.0])


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_pact_fake_quant_equals_clip_then_quantize(bits):
    x = _data(seed=2)
    up = _data(seed=3, scale=1.0)

    def composed(x, alpha):
        return fake_quant(pact_clip(x, alpha), alpha.abs().detach(), bits)

    ours = _grads(lambda x, a: pact_fake_quant(x, a, bits), x, 1.7, up)
    ref = _grads(composed, x, 1.7, up)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_input_without_gradient_still_trains_alpha():
    x = paddle.to_tensor(_data(seed=5))  # e.g. the image fed to the first conv
    alpha = paddle.to_tensor([1.0], stop_gradient=False)
    pact_fake_quant(x, alpha, 8).sum().backward()
    assert alpha.grad is not None and abs(float(alpha.grad.numpy()[0])) > 0


def test_negative_alpha_acts_as_its_magnitude():
    x = _data(seed=6)
    pos = pact_clip(paddle.to_tensor(x), paddle.to_tensor([1.5])).numpy()
    neg = pact_clip(paddle.to_tensor(x), paddle.to_tensor([-1.5])).numpy()
    np.testing.assert_array_equal(pos, neg)


def _train_alpha(pact, x, steps=40, lr=0.1):
    opt = paddle.optimizer.SGD(learning_rate=lr, parameters=pact.parameters())
    pact.train()
    for _ in range(steps):
        loss = ((pact(x) - x) ** 2).mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
    return float(pact.alpha.numpy()[0])


def test_training_moves_alpha_up_when_the_clip_is_too_tight():
    x = paddle.to_tensor(np.clip(_data(seed=7, scale=1.0), -2, 2))  # abs max 2
    alpha = _train_alpha(PACT(init_value=0.5), x, steps=60, lr=0.5)
    assert 1.5 < alpha <= 2.0 + 1e-3


def test_decay_pulls_a_too_wide_alpha_down():
    x = paddle.to_tensor(np.clip(_data(seed=7, scale=1.0), -2, 2))
    alpha = _train_alpha(PACT(init_value=5.0, decay=0.05), x, steps=20)
    assert alpha < 5.0 * (1 - 0.1 * 0.05) ** 20 + 1e-4  # pure decay while nothing is clipped
    assert alpha > 2.0


def test_lr_multiplier_and_decay_reach_the_parameter():
    pact = PACT(init_value=4.0, lr_mult=10.0, decay=1e-3)
    assert pact.alpha.optimize_attr["learning_rate"] == 10.0
    assert pact.alpha.regularizer is not None
    # with no clipped value, only the decay moves alpha: 4 - lr * 10 * 1e-3 * 4
    opt = paddle.optimizer.SGD(learning_rate=0.5, parameters=pact.parameters())
    pact.train()
    pact(paddle.to_tensor([0.1, -0.2])).sum().backward()
    opt.step()
    assert float(pact.alpha.numpy()[0]) == pytest.approx(4.0 - 0.5 * 10.0 * 1e-3 * 4.0, rel=1e-5)


def test_warmup_follows_the_moving_average_then_learns():
    pact = PACT(init_value=None, warmup_steps=3, moving_rate=0.5)
    pact.train()
    state = accum = 0.0
    for i in range(3):
        x_np = _data(seed=10 + i)
        x = paddle.to_tensor(x_np, stop_gradient=False)
        pact(x).sum().backward()
        state, accum = 0.5 * state + 1, 0.5 * accum + float(np.abs(x_np).max())
        assert float(pact.alpha.numpy()[0]) == pytest.approx(accum / state, rel=1e-5)
        assert pact.alpha.grad is None  # not trained during the warm-up
    assert not pact.in_warmup()
    before = float(pact.alpha.numpy()[0])
    x = paddle.to_tensor(_data(seed=20, scale=10.0), stop_gradient=False)
    pact(x).sum().backward()
    assert float(pact.alpha.numpy()[0]) == before  # no longer set from data
    assert pact.alpha.grad is not None and abs(float(pact.alpha.grad.numpy()[0])) > 0


def test_a_loaded_checkpoint_after_the_warmup_keeps_its_alpha():
    src = PACT(init_value=None, warmup_steps=2)
    src.train()
    for i in range(2):
        src(paddle.to_tensor(_data(seed=30 + i)))
    with paddle.no_grad():
        src.alpha.set_value(paddle.to_tensor([0.123]))  # as if trained
    dst = PACT(init_value=None, warmup_steps=2)
    dst.set_state_dict(src.state_dict())
    dst.train()
    dst(paddle.to_tensor(_data(seed=40, scale=50.0)))
    assert float(dst.alpha.numpy()[0]) == pytest.approx(0.123)


def test_eval_before_any_training_initialises_from_the_input(caplog):
    pact = PACT(init_value=None)
    pact.eval()
    x = _data(seed=50)
    with caplog.at_level(logging.WARNING, logger="qtrainer.quant.quanters.pact"):
        out = pact(paddle.to_tensor(x))
    assert "never initialised" in caplog.text
    np.testing.assert_allclose(out.numpy(), x, rtol=1e-6)  # alpha = abs max: nothing clipped


def test_pact_quanter_scale_is_alpha_and_the_fused_step_matches():
    pact = PACT(init_value=1.25)
    quanter = PACTQuanter(pact, quant_bits=4)
    np.testing.assert_allclose(quanter.scale().numpy(), [1.25])
    assert "alpha" not in dict(quanter.named_parameters())  # owned by the PACT layer only
    x = paddle.to_tensor(_data(seed=60))
    for mode in ("train", "eval"):
        getattr(pact, mode)()
        np.testing.assert_allclose(
            quanter.clip_and_quantize(x).numpy(), quanter(pact(x)).numpy(), rtol=1e-6, atol=1e-6
        )


def test_record_clipping():
    pact = PACT(init_value=1.0)
    pact.record_clipping = True
    pact(paddle.to_tensor([0.5, 2.0, -3.0, 0.0]))
    assert float(pact.last_clip_fraction) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs", [{"init_value": 0.0}, {"lr_mult": 0}, {"decay": -1.0}, {"warmup_steps": -2}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="PACT"):
        PACT(**kwargs)


@pytest.mark.parametrize("fused", [False, True])
def test_warmup_leaves_alpha_out_of_the_graph_with_the_plain_fake_quant_values(fused):
    """During the warm-up alpha gets no gradient (as before the redesign: old checkpoints' optimizer
    states hold none for it); values and the input gradient are the plain fake quant's."""
    pact = PACT(init_value=None, warmup_steps=5)
    pact.train()
    assert pact.may_leave_parameters_unused
    x_np = _data(seed=40)
    x = paddle.to_tensor(x_np, stop_gradient=False)
    out = pact.clip_and_fake_quant(x, 8) if fused else pact(x)
    (out * out).sum().backward()
    assert pact.alpha.grad is None
    t = pact.threshold()
    xr = paddle.to_tensor(x_np, stop_gradient=False)
    ref = fake_quant(xr, t, 8) if fused else paddle.clip(xr, -t, t)
    (ref * ref).sum().backward()
    np.testing.assert_array_equal(out.numpy(), ref.numpy())
    np.testing.assert_allclose(x.grad.numpy(), xr.grad.numpy(), rtol=1e-6)


def test_a_fixed_alpha_never_leaves_a_parameter_unused():
    assert not PACT(init_value=4.0).may_leave_parameters_unused
