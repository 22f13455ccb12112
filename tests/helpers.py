"""Tiny models and data shared by the tests (seconds, not minutes, on 2 CPU cores)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import paddle
from paddle import nn

from qtrainer import Module

FASHION_MNIST_DIR = os.environ.get("QTRAINER_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child ``python``: one thread, and this checkout's qtrainer importable."""
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_script(script: str, *args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python script args`` from the repo root in a new session; on ``timeout`` kill the whole
    session and fail the test (a hang must fail, not stall the suite). stderr goes to stdout."""
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=child_env(**(env or {})), cwd=REPO_ROOT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"`{' '.join(map(str, args))}` did not finish in {timeout} s (hang?):\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


class NoisyPoints(paddle.io.Dataset):
    """Fixed 2-class points; every read adds NumPy noise, so loading consumes the NumPy RNG."""

    def __init__(self, n: int = 64, features: int = 8, seed: int = 0) -> None:
        rng = np.random.RandomState(seed)
        self.x = rng.normal(size=(n, features)).astype("float32")
        self.y = (self.x[:, :2].sum(axis=1) > 0).astype("int64")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        noise = np.random.normal(scale=0.01, size=self.x[i].shape).astype("float32")
        return self.x[i] + noise, self.y[i]


def make_loader(n: int = 64, batch_size: int = 8, shuffle: bool = True, seed: int = 0) -> paddle.io.DataLoader:
    return paddle.io.DataLoader(NoisyPoints(n, seed=seed), batch_size=batch_size, shuffle=shuffle)


class TinyModule(Module):
    """An MLP with dropout (consumes Paddle's RNG) and an epoch LR schedule."""

    def __init__(self, features: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y.reshape([-1]))
        self.log("train_loss", loss, prog_bar=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y.reshape([-1])))
        self.log("val_acc", (logits.argmax(-1) == y.reshape([-1])).astype("float32").mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y.reshape([-1])))

    def configure_optimizers(self):
        scheduler = paddle.optimizer.lr.StepDecay(self.lr, step_size=1, gamma=0.5)
        optimizer = paddle.optimizer.Adam(scheduler, parameters=self.parameters())
        return optimizer, scheduler


def quiet_trainer_kwargs(tmp_path, **overrides):
    """Trainer arguments for tests: no progress bar, no default logger, files under tmp_path."""
    kwargs = dict(default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False,
                  enable_checkpointing=False, num_threads=1)
    kwargs.update(overrides)
    return kwargs
