"""QAT with your own preprocessing and quantizers (the four user-class arguments of ``QAT``).

The contract (details in ``qtrainer/quant/qat.py``):

* ``weight_preprocess`` / ``act_preprocess``: a ``paddle.nn.Layer`` subclass built with no
  arguments; ``forward(x)`` returns a tensor of the same shape, applied before quantization.
* ``weight_quantize`` / ``act_quantize``: a ``paddle.nn.Layer`` subclass that replaces the default
  quanter. Its ``__init__`` receives ``quant_bits`` and ``axis`` (the weight's output-channel axis,
  or ``None``) when it accepts them; ``forward(x)`` returns the fake-quantized tensor; ``scale()``
  returns the clipping threshold ``T`` (``x_q = round(x / T * qmax) * T / qmax``), which the
  export writes.

Run: ``python examples/custom_quanter.py``
"""
from __future__ import annotations

import numpy as np
import paddle
from paddle import nn

from qtrainer.quant.methods.qat import QAT
from qtrainer.quant.quanters.fake_quant import fake_quant
from qtrainer.quant.diagnostics.stats import collect_quant_stats


class ClipOutliers(nn.Layer):
    """Weight preprocessing: clip each weight tensor at 3x its root mean square."""

    def forward(self, w):
        limit = paddle.sqrt((w * w).mean()) * 3.0
        return paddle.clip(w, -limit, limit)


class EMAQuanter(nn.Layer):
    """Activation quantizer: threshold = exponential moving average of the batch abs max."""

    def __init__(self, quant_bits=8, axis=None, momentum=0.95):
        super().__init__()
        self.quant_bits, self.axis, self.momentum = quant_bits, axis, momentum
        # persistable buffers travel in checkpoints
        self.register_buffer("threshold", paddle.zeros([1]), persistable=True)
        self.register_buffer("steps", paddle.zeros([1]), persistable=True)

    def forward(self, x):
        if self.training:
            with paddle.no_grad():
                current = x.abs().max().reshape([1])
                first = (self.steps == 0).astype("float32")
                new = first * current + (1 - first) * (
                    self.momentum * self.threshold + (1 - self.momentum) * current
                )
                paddle.assign(new, output=self.threshold)
                self.steps.add_(paddle.ones([1]))
        return fake_quant(x, self.scale(), self.quant_bits)

    def scale(self):
        return paddle.clip(self.threshold, min=1e-8)


class RMSQuanter(nn.Layer):
    """Weight quantizer: per-channel threshold = 4x the root mean square of that channel."""

    def __init__(self, quant_bits=8, axis=None):
        super().__init__()
        self.quant_bits, self.axis = quant_bits, axis
        self._last = None

    def forward(self, w):
        axes = [d for d in range(w.ndim) if d != self.axis] if self.axis is not None else None
        with paddle.no_grad():
            mean_square = (w * w).mean(axis=axes) if axes else (w * w).mean().reshape([1])
            t = paddle.sqrt(mean_square) * 4.0
            self._last = paddle.clip(t, min=1e-8)
        return fake_quant(w, self._last, self.quant_bits, self.axis)

    def scale(self):
        return self._last


class SmallNet(nn.Layer):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2D(1, 8, 3, padding=1), nn.BatchNorm2D(8), nn.ReLU(), nn.MaxPool2D(2),
            nn.Conv2D(8, 16, 3, padding=1), nn.BatchNorm2D(16), nn.ReLU(), nn.AdaptiveAvgPool2D(1),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def main(steps: int = 20, seed: int = 0) -> dict:
    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    net = SmallNet()
    quanter = QAT(
        config={"weight_bits": 8, "activation_bits": 8},
        weight_preprocess=ClipOutliers,
        weight_quantize=RMSQuanter,
        act_quantize=EMAQuanter,
    )
    quanter.quantize(net)  # before creating the optimizer
    opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=net.parameters())
    # a toy task: the label is the quadrant holding the brightest pixel
    for _ in range(steps):
        x = rng.standard_normal((16, 1, 12, 12)).astype("float32")
        y = (np.argmax(x.reshape(16, -1), axis=1) % 10).reshape(16, 1)
        loss = nn.functional.cross_entropy(net(paddle.to_tensor(x)), paddle.to_tensor(y))
        loss.backward()
        opt.step()
        opt.clear_grad()
    net.eval()
    stats = collect_quant_stats(net)
    for name, entry in stats.items():
        print(
            f"{name:12s} act_scale={entry['act_scale']:.3f} "
            f"weight_scales={np.round(entry['weight_scale'][:3], 3)}... "
            f"weight SQNR={entry['weight_sqnr_db']:.1f} dB"
        )
    # quanter.save_quantized_model(net, "./custom_quant_model",
    #     input_spec=[paddle.static.InputSpec([None, 1, 12, 12], "float32")])
    return stats


if __name__ == "__main__":
    main()
