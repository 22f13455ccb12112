"""Putting each int8 convolution's bias on the int32 grid onnxruntime computes it on.

onnxruntime (``QLinearConv``, as TFLite and other integer runtimes) adds a convolution's bias as
int32 codes of step ``x_scale * w_scale``: the folded bias (batch norm included) is rounded to that
grid. The rounding is a constant per output channel of up to half a step, below 1% of the next
activation's step, but the next quantization turns it into flipped codes, and through a deep
network into flipped answers: a trained MobileNetV1 x0.25 agreed with its simulation on 98.8% of
the Fashion-MNIST test images in onnxruntime, 99.9% with the biases on the grid. Paddle Inference
and OpenVINO add the bias in float and compute the same either way.

``align_biases`` moves the model's own bias onto that grid instead: each shift is added to the
parameter the Paddle program adds last to the bias (a batch norm's ``beta``, or the convolution's
bias), in place, so the model, its simulation and every deployment compute the same bias. The
shifts come from the ONNX conversion (``onnx.onnx_bias_shifts``) of a program traced from a copy
of the model, and reach the model's parameters by their structured names.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from paddle import nn

__all__ = ["ALIGN_BIASES", "align_biases"]

#: ``export_quantized_model(align_biases=...)``: ``'auto'`` (when an ONNX model is written), ``True``, ``False``
ALIGN_BIASES = ("auto", True, False)


def align_biases(models: list[nn.Layer], traced: nn.Layer, shifts: dict[str, np.ndarray]) -> dict[str, Any]:
    """Add ``shifts`` (by parameter name of ``traced``, the layer the program was traced from) to
    the parameters at the same structured names in each of ``models``; return what was done:
    ``{"biases": count, "max_shift": largest |shift|, "not_found": names without a parameter of that
    size in every model}``."""
    paths = {param.name: path for path, param in traced.named_parameters()}
    by_path = [dict(model.named_parameters()) for model in models]
    done, largest, not_found = 0, 0.0, []
    for name, shift in sorted(shifts.items()):
        path = paths.get(name)
        targets = [params.get(path) for params in by_path] if path else [None]
        if any(t is None or int(np.prod(t.shape)) != shift.size for t in targets):
            not_found.append(path or name)
            continue
        for param in targets:
            value = param.numpy()
            param.set_value((value.astype(np.float64) + shift.reshape(value.shape)).astype(value.dtype))
        done += 1
        largest = max(largest, float(np.max(np.abs(shift))) if shift.size else 0.0)
    return {"biases": done, "max_shift": largest, "not_found": not_found}
