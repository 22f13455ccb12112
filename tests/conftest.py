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


@pytest.fixture(scope="session")
def spawn_fit(tmp_path_factory):
    """A ``Trainer(strategy="ddp", devices=2)`` fit in a child process (tests/distributed_jobs.py)."""
    from distributed_jobs import check_child, run_child

    out = tmp_path_factory.mktemp("spawn_fit")
    check_child(run_child("spawn-fit", str(out)))
    return out


@pytest.fixture(scope="session")
def group(tmp_path_factory):
    """Several short fits in one 2-process ``paddle.distributed.spawn`` group (tests/distributed_jobs.py)."""
    from distributed_jobs import check_child, run_child

    out = tmp_path_factory.mktemp("group")
    check_child(run_child("group", str(out)))
    return out
