"""qtrainer/optim.py: what configure_optimizers may return, and optimizer state across processes."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.optim import load_portable_optimizer_state, parse_optimizers, portable_optimizer_state


def adam(net, lr=0.1):
    return paddle.optimizer.Adam(lr, parameters=net.parameters())


def test_the_accepted_shapes_of_configure_optimizers():
    net = nn.Linear(2, 2)
    optimizer = adam(net)
    scheduler = paddle.optimizer.lr.StepDecay(0.1, step_size=1)
    with_scheduler = paddle.optimizer.Adam(scheduler, parameters=net.parameters())
    assert parse_optimizers(optimizer) == ([optimizer], [])
    optimizers, configs = parse_optimizers((with_scheduler, scheduler))
    assert optimizers == [with_scheduler] and configs == [{"scheduler": scheduler, "interval": "epoch", "frequency": 1}]
    _, configs = parse_optimizers({"optimizer": with_scheduler,
                                   "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 2}})
    assert configs == [{"scheduler": scheduler, "interval": "step", "frequency": 2}]
    _, configs = parse_optimizers(with_scheduler)  # the optimizer's own scheduler is found
    assert configs[0]["scheduler"] is scheduler


@pytest.mark.parametrize("result, error, message", [
    ("sgd", TypeError, r"configure_optimizers returned str; expected an optimizer"),
    ({"lr_scheduler": None}, TypeError, r"a dict without 'optimizer'"),
])
def test_bad_results_are_refused_saying_what_is_expected(result, error, message):
    with pytest.raises(error, match=message):
        parse_optimizers(result)


def test_bad_scheduler_settings_are_refused():
    net = nn.Linear(2, 2)
    scheduler = paddle.optimizer.lr.StepDecay(0.1, step_size=1)
    optimizer = paddle.optimizer.Adam(scheduler, parameters=net.parameters())
    with pytest.raises(ValueError, match=r"interval='batch': use 'step' or 'epoch'"):
        parse_optimizers({"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "batch"}})
    with pytest.raises(ValueError, match=r"lr_scheduler frequency=0: use a positive integer"):
        parse_optimizers({"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "frequency": 0}})


def train_one_step(net, optimizer):
    loss = net(paddle.ones([3, 2])).sum()
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()


def test_portable_state_moves_to_a_model_whose_parameters_have_other_names():
    paddle.seed(0)
    source = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    optimizer = adam(source)
    train_one_step(source, optimizer)
    state = portable_optimizer_state(optimizer, source)
    assert all(key.split("_")[0] in ("0.weight", "0.bias", "1.weight", "1.bias") for key in state["accumulators"])
    target = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))  # new parameter names (linear_2.w_0, ...)
    target.set_state_dict(source.state_dict())
    moved = adam(target)
    load_portable_optimizer_state(moved, target, state)
    train_one_step(source, optimizer)
    train_one_step(target, moved)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-7, err_msg=name)


def test_state_for_a_parameter_the_model_lacks_is_refused():
    net = nn.Linear(2, 2)
    optimizer = adam(net)
    train_one_step(net, optimizer)
    state = portable_optimizer_state(optimizer, net)
    state["accumulators"]["head.weight_moment1_0"] = np.zeros(2)
    with pytest.raises(ValueError, match=r"parameter 'head.weight_moment1_0', which the model does not have"):
        load_portable_optimizer_state(adam(net), net, state)
