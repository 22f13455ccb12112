"""TensorBoard itself, in a browser, on the event files of a tiny QAT fit: the statistics arrive
grouped by statistic, the custom-scalars layout is served, and the page renders.

Skipped when TensorBoard or a headless Chromium is missing. ``QTRAINER_TB_SCREENSHOT=<path>``
keeps a copy of the screenshot (to look at it).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer import ClassificationModule, Trainer
from qtrainer.loggers import TensorBoardLogger
from qtrainer.quant import QATCallback

from helpers import quiet_trainer_kwargs

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium")


def _browser() -> str:
    found = next((path for path in map(shutil.which, _BROWSERS) if path), None)
    if found is None:
        pytest.skip(f"no headless Chromium found (looked for {', '.join(_BROWSERS)})")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _qat_fit(root) -> str:
    """Two epochs of a tiny QAT fit on random 8x8 images; returns the TensorBoard run directory."""
    paddle.seed(0)
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((48, 1, 8, 8)).astype("float32"))
    y = paddle.to_tensor(rng.integers(0, 2, size=(48,)).astype("int64"))
    loader = paddle.io.DataLoader(paddle.io.TensorDataset([x, y]), batch_size=8, shuffle=False)
    net = nn.Sequential(nn.Conv2D(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    logger = TensorBoardLogger(str(root), name="qat")
    trainer = Trainer(**quiet_trainer_kwargs(root, max_epochs=2, logger=logger, log_every_n_steps=50))
    trainer.fit(ClassificationModule(net, lr=0.01), loader, callbacks=[QATCallback(export_dir=False)])
    return logger.log_dir


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_for_tags(base: str, process: subprocess.Popen, timeout: float = 25.0) -> dict:
    """The scalars plugin's ``{run: {tag: ...}}`` once TensorBoard has loaded some tags."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tensorboard exited with code {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            tags = _get_json(f"{base}/data/plugin/scalars/tags")
            if any(tags.values()):
                return tags
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"tensorboard at {base} served no scalar tags within {timeout:.0f} s")


def test_tensorboard_serves_the_grouped_statistics_and_renders_them(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard is not installed (pip install tensorboard)")
    browser = _browser()
    _qat_fit(tmp_path / "logs")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "logs"), "--port", str(port),
         "--host", "127.0.0.1", "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        tags = _wait_for_tags(base, process)
        (run,) = tags
        scalar_tags = set(tags[run])
        assert {"quant/act_scale/net.0", "quant/act_scale/net.3", "quant/weight_sqnr_db/net.0",
                "quant/act_clip_fraction/net.3", "quant/summary/min_weight_sqnr_db"} <= scalar_tags
        sections = {tag.split("/")[1] for tag in scalar_tags if tag.startswith("quant/")}
        assert not sections & {"net.0", "net.3"}  # grouped by statistic: no section per layer

        layout = _get_json(f"{base}/data/plugin/custom_scalars/layout")
        charts = {chart["title"]: chart["multiline"]["tag"] for category in layout["category"]
                  for chart in category["chart"]}
        assert charts["act_scale"] == ["quant/act_scale/.*"] and "weight_sqnr_db" in charts
        images = _get_json(f"{base}/data/plugin/images/tags")[run]
        assert {"quant_charts/weight_sqnr_db", "quant_charts/act_scale"} <= set(images)

        screenshot = tmp_path / "custom_scalars.png"
        subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1400,1000",
             "--virtual-time-budget=15000", f"{base}/#custom_scalars"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False,
        )
        assert screenshot.exists(), f"{browser} wrote no screenshot"
        from PIL import Image

        pixels = np.asarray(Image.open(screenshot).convert("RGB"))
        assert pixels.shape[:2] == (1000, 1400)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a drawn page, not a blank one
        if os.environ.get("QTRAINER_TB_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["QTRAINER_TB_SCREENSHOT"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
