"""The recipe's trained FP32 MobileNetV1 on Fashion-MNIST for the PTQ benchmarks, and logits of its variants."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import paddle

from qtrainer.quant.export.inference import run_predictor
from recipes import run as recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "qtrainer_bias_correction")


def recipe_fp32(weights: str | None, out: str = DEFAULT_OUT):
    """``(settings, fp32 net, train loader, val loader)``: ``weights``, or the recipe's FP32 stage trained into ``out``."""
    settings = recipe.parse_args(["mobilenet_v1", "ptq", "--out", out])
    weights = weights or settings.fp32_weights
    if not os.path.isfile(weights):
        subprocess.run([sys.executable, "-m", "recipes.run", "mobilenet_v1", "fp32", "--out", out, "--overwrite"],
                       check=True, cwd=ROOT)
    train, val, num_classes = recipe.build_loaders(settings)
    net = recipe.build_net(settings, num_classes)
    recipe.load_weights(net, weights, "mobilenet_v1")
    return settings, net, train, val


def logits_of(net: paddle.nn.Layer, loader) -> tuple[np.ndarray, np.ndarray]:
    """The dygraph logits and labels of every batch of ``loader``."""
    net.eval()
    outs, labels = [], []
    with paddle.no_grad():
        for images, target in loader:
            outs.append(net(images).numpy())
            labels.append(target.numpy().reshape(-1))
    return np.concatenate(outs), np.concatenate(labels)


def deployed_logits(predictor, loader) -> np.ndarray:
    """A Paddle Inference predictor's logits on every batch of ``loader``."""
    return run_predictor(predictor, ([images.numpy()] for images, _ in loader))[0]
