"""Empirical bias correction of a frozen PTQ model (Nagel et al. 2019, "data-free quantization", sec. 4.2).

Quantizing a layer's weight (and its input) shifts the mean of its output per channel; the
following layers see that shift as a bias, which hurts most where each output channel has few
weights (depthwise convolutions) or few weight bits. ``correct_bias(model, batches)`` measures,
for every quantized layer in forward order, the mean output per channel of the float model and of
the quantized model (earlier layers already corrected) on the calibration batches, and adds the
difference to the layer's bias. The bias is not quantized (Paddle Inference, OpenVINO and
onnxruntime add it in float or int32), so the correction reaches the deployed model unchanged.

Cost: one float pass over the batches, then for each quantized layer one quantized pass that
stops at that layer: about ``layers / 2 + 1`` forward passes of the batches in all.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import paddle
from paddle import nn

from qtrainer.quant.methods.ptq import FROZEN, state_of
from qtrainer.quant.transforms.wrap import QuantedLayer, computing_float, iter_quanted_layers

__all__ = ["BiasCorrection", "correct_bias"]

logger = logging.getLogger(__name__)


@dataclass
class BiasCorrection:
    """What ``correct_bias`` changed: per layer the largest |shift| added to its bias, and the layers skipped."""

    batches: int
    corrected: dict[str, float] = field(default_factory=dict)  # name -> max |bias change|
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _channel_axis(layer: QuantedLayer) -> int:
    return 1 if layer.layer_type == "Conv2D" else -1


def _channel_sum(output: paddle.Tensor, axis: int) -> tuple[np.ndarray, int]:
    values = output.numpy().astype("float64")
    values = np.moveaxis(values, axis, -1)
    flat = values.reshape(-1, values.shape[-1])
    return flat.sum(axis=0), flat.shape[0]


class _MeanRecorder:
    """Per-channel output sums of the chosen layers over the batches of a pass."""

    def __init__(self, layers: dict[str, QuantedLayer], stop_after: str | None = None) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.order: list[str] = []  # first calls, in forward order
        self.handles = []
        for name, layer in layers.items():
            self.handles.append(layer.register_forward_post_hook(self._hook(name, layer, name == stop_after)))

    def _hook(self, name: str, layer: QuantedLayer, stop: bool):
        axis = _channel_axis(layer)

        def hook(_layer, _inputs, output):
            total, count = _channel_sum(output, axis)
            if name not in self.sums:
                self.order.append(name)
            self.sums[name] = self.sums.get(name, 0.0) + total
            self.counts[name] = self.counts.get(name, 0) + count
            if stop:
                raise _StopForward

        return hook

    def reduce(self, all_reduce: Callable[[np.ndarray, str], np.ndarray] | None, names: list[str]) -> None:
        """Sum ``names``' statistics over the data-parallel ranks (every rank passes the same names)."""
        if all_reduce is None:
            return
        for name in names:
            self.sums[name] = np.asarray(all_reduce(np.asarray(self.sums[name], dtype=np.float64), "sum"))
            self.counts[name] = int(np.asarray(all_reduce(np.asarray([self.counts[name]], dtype=np.float64), "sum"))[0])

    def mean(self, name: str) -> np.ndarray | None:
        return None if name not in self.sums else self.sums[name] / max(self.counts[name], 1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _run(model: nn.Layer, batches: Sequence[Any], recorder: _MeanRecorder) -> None:
    try:
        with paddle.no_grad():
            for batch in batches:
                try:
                    model(paddle.to_tensor(batch) if not isinstance(batch, paddle.Tensor) else batch)
                except _StopForward:
                    pass
    finally:
        recorder.remove()


def correct_bias(model: nn.Layer, batches: Sequence[Any],
                 all_reduce: Callable[[np.ndarray, str], np.ndarray] | None = None) -> BiasCorrection:
    """Correct, in place, the bias of every quantized layer of a frozen PTQ ``model``; see the module docstring.

    Args:
        model: a model after ``PTQ.quantize`` + calibration + ``freeze`` (thresholds fixed).
        batches: model inputs (arrays or Tensors, one per forward), e.g. the calibration batches.
        all_reduce: in a data-parallel run, ``trainer.strategy.all_reduce`` (call this on every
            rank): the means are taken over every rank's batches, so all ranks get the same biases.

    Returns:
        a ``BiasCorrection``. Layers without a bias (``bias_attr=False``) are skipped and named
        (PTQ's ``fuse=True`` folds batch norms into biased convolutions).

    Raises:
        ValueError: no quantized layer, no batch, or the model is not frozen.
    """
    layers = dict(iter_quanted_layers(model))
    if not layers:
        raise ValueError(f"correct_bias: {type(model).__name__} has no quantized layer; run PTQ.quantize first")
    batches = list(batches) if batches is not None else []
    if not batches:
        raise ValueError("correct_bias needs calibration data: give at least one batch of representative inputs")
    not_frozen = [n for n, layer in layers.items() if state_of(layer) != FROZEN]
    if not_frozen:
        raise ValueError(
            f"correct_bias: {not_frozen[:3]} are not frozen; calibrate and freeze the PTQ model first "
            "(qtrainer.quant.calibrate + PTQ.freeze, or PTQ.save_quantized_model's steps)"
        )
    was_training = model.training
    model.eval()
    result = BiasCorrection(batches=len(batches))
    try:
        floats = _MeanRecorder(layers)
        with computing_float(model):
            _run(model, batches, floats)
        floats.reduce(all_reduce, floats.order)
        for name in [n for n in layers if n not in floats.order]:
            result.skipped[name] = "not reached by the batches"
        for name in floats.order:  # forward order: each layer is corrected after the ones before it
            layer = layers[name]
            if layer.bias is None:
                result.skipped[name] = "no bias"
                continue
            quantized = _MeanRecorder({name: layer}, stop_after=name)
            _run(model, batches, quantized)
            quantized.reduce(all_reduce, [name])
            shift = floats.mean(name) - quantized.mean(name)
            with paddle.no_grad():
                layer.bias.set_value((layer.bias.numpy().astype("float64") + shift).astype(layer.bias.numpy().dtype))
            result.corrected[name] = float(np.max(np.abs(shift))) if shift.size else 0.0
    finally:
        model.train() if was_training else model.eval()
    logger.info("PTQ bias correction on %d batch(es): %d layer(s) corrected (largest shift %.3g), %d skipped",
                len(batches), len(result.corrected), max(result.corrected.values(), default=0.0), len(result.skipped))
    return result
