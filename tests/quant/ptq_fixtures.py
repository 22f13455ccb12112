"""A small CNN trained on a Fashion-MNIST slice, shared by the PTQ tests (trained once per process)."""
from __future__ import annotations

import copy
import functools

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from qtrainer.data import FashionMNISTDataset

TRAIN_IMAGES, TEST_IMAGES = 2048, 512


def small_cnn() -> nn.Sequential:
    """Two conv -> BN -> ReLU -> pool blocks and a Linear head (bias-free convolutions before the BNs)."""
    return nn.Sequential(
        nn.Conv2D(1, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8), nn.ReLU(), nn.MaxPool2D(2),
        nn.Conv2D(8, 16, 3, padding=1, bias_attr=False), nn.BatchNorm2D(16), nn.ReLU(), nn.MaxPool2D(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )


@functools.lru_cache(maxsize=1)
def _trained() -> tuple[nn.Layer, FashionMNISTDataset, FashionMNISTDataset]:
    train = FashionMNISTDataset("train", limit=TRAIN_IMAGES)
    test = FashionMNISTDataset("test", limit=TEST_IMAGES)
    paddle.seed(0)
    np.random.seed(0)
    net = small_cnn()
    optimizer = paddle.optimizer.Adam(3e-3, parameters=net.parameters())
    loader = paddle.io.DataLoader(train, batch_size=64, shuffle=True)
    for _ in range(2):
        for x, y in loader:
            loss = F.cross_entropy(net(x), y.reshape([-1]).astype("int64"))
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
    net.eval()
    return net, train, test


def trained_cnn() -> nn.Layer:
    """A fresh copy of the trained CNN, in eval mode (BatchNorms with real running statistics)."""
    return copy.deepcopy(_trained()[0])


def datasets() -> tuple[FashionMNISTDataset, FashionMNISTDataset]:
    _, train, test = _trained()
    return train, test


def calibration_batches(n: int = 8, batch_size: int = 64) -> list[paddle.Tensor]:
    train, _ = datasets()
    return [paddle.to_tensor(train.images[i * batch_size:(i + 1) * batch_size]) for i in range(n)]


def predictions(model: nn.Layer, images: np.ndarray) -> np.ndarray:
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(images)).numpy().argmax(-1)
