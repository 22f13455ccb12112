"""The benchmarks' small real-data model: the examples' small CNN trained on Fashion-MNIST."""
from __future__ import annotations

import os
import sys

import numpy as np
import paddle
import paddle.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from train_fashion_mnist import small_cnn  # noqa: E402

from qtrainer.data import load_fashion_mnist  # noqa: E402

MEAN, STD = 0.2860, 0.3530


def normalised(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 [N, 1, 28, 28] standardised, labels int64 [N])`` of a Fashion-MNIST split."""
    images, labels = load_fashion_mnist(split)
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None], labels.astype("int64")


def dygraph_logits(net: paddle.nn.Layer, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """``net``'s logits for every image, ``batch`` images at a time, without gradients (mode as set)."""
    with paddle.no_grad():
        return np.concatenate([net(paddle.to_tensor(images[i:i + batch])).numpy()
                               for i in range(0, len(images), batch)])


def train(steps: int, batch_size: int, lr: float) -> paddle.nn.Layer:
    """The small CNN after ``steps`` Adam steps on shuffled training batches (seeded), in eval mode."""
    images, labels = normalised("train")
    paddle.seed(0)
    order = np.random.RandomState(0).permutation(len(labels))
    net = small_cnn()
    optimizer = paddle.optimizer.Adam(lr, parameters=net.parameters())
    net.train()
    for step in range(steps):
        index = order[(step * batch_size) % len(order):][:batch_size]
        loss = F.cross_entropy(net(paddle.to_tensor(images[index])), paddle.to_tensor(labels[index]))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    net.eval()
    return net
