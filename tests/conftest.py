"""Fixtures shared by the tests; the tiny models and data live in helpers.py."""
from __future__ import annotations

import os

import paddle
import pytest

from helpers import FASHION_MNIST_DIR, TinyModule


@pytest.fixture
def tiny_module():
    paddle.seed(0)
    return TinyModule()


@pytest.fixture
def fashion_mnist_dir():
    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST not found in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST_DIR
