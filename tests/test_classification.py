"""ClassificationModule on real data (a Fashion-MNIST slice) and its argument checks."""
from __future__ import annotations

import math

import paddle
import pytest
from paddle import nn

from qtrainer import ClassificationModule, Trainer
from qtrainer.data import FashionMNISTDataset

from helpers import quiet_trainer_kwargs


def tiny_cnn():
    return nn.Sequential(nn.Conv2D(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))


def test_learns_fashion_mnist_slice(tmp_path, fashion_mnist_dir):
    paddle.seed(0)
    train = paddle.io.DataLoader(FashionMNISTDataset("train", fashion_mnist_dir, limit=2048), batch_size=64, shuffle=True)
    test = paddle.io.DataLoader(FashionMNISTDataset("test", fashion_mnist_dir, limit=512), batch_size=256)
    module = ClassificationModule(tiny_cnn(), lr=3e-3, scheduler="cosine")
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=2, seed=0))
    trainer.fit(module, train, test)
    [metrics] = trainer.test(module, test)
    assert metrics["test_acc"] > 0.70  # chance is 0.10
    assert metrics["test_acc_top5"] >= metrics["test_acc"]
    assert trainer.optimizers[0].get_lr() < 3e-3  # the cosine schedule advanced


@pytest.mark.parametrize("kwargs, message", [
    (dict(optimizer="lamb"), "optimizer='lamb' is not supported"),
    (dict(scheduler="linear"), "scheduler='linear' is not supported"),
    (dict(lr=0), "lr=0"),
    (dict(label_smoothing=1.0), "label_smoothing=1.0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassificationModule(tiny_cnn(), **kwargs)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "momentum"])
def test_every_named_optimizer_builds(optimizer):
    module = ClassificationModule(tiny_cnn(), optimizer=optimizer, weight_decay=1e-4)
    assert isinstance(module.configure_optimizers(), paddle.optimizer.Optimizer)


def test_a_step_capped_run_anneals_per_step_to_the_cap(tmp_path, fashion_mnist_dir):
    """With max_steps the named schedules span the optimizer steps (a short run still decays)."""
    train = paddle.io.DataLoader(FashionMNISTDataset("train", fashion_mnist_dir, limit=640), batch_size=64)
    module = ClassificationModule(tiny_cnn(), lr=1e-2, scheduler="cosine")
    trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_steps=6, seed=0))
    trainer.fit(module, train)
    [config] = trainer.lr_schedulers
    assert config["interval"] == "step"
    assert trainer.optimizers[0].get_lr() == pytest.approx(1e-2 * (1 + math.cos(math.pi * 6 / 6)) / 2, abs=1e-9)


def test_an_epoch_run_anneals_per_epoch(tmp_path):
    module = ClassificationModule(tiny_cnn(), lr=1e-2, scheduler="step")
    module._trainer = Trainer(**quiet_trainer_kwargs(tmp_path, max_epochs=9))
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert config["lr_scheduler"]["scheduler"].step_size == 3
