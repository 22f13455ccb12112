"""What the loops do with one batch: its size, moving it to the device, and naming the layer it does not fit."""
from __future__ import annotations

from typing import Any

import paddle

__all__ = ["batch_size", "to_device", "raise_layer_error"]


def batch_size(batch: Any) -> int:
    """The first dimension of the batch's first tensor (1 when it has none)."""
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    if isinstance(first, dict) and first:
        first = next(iter(first.values()))
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else 1


def raise_layer_error(exc: ValueError, module: paddle.nn.Layer, where: str) -> None:
    """Re-raise Paddle's shape error from inside a layer as one naming the layer and its expected input.

    Costs nothing until a step raises: the failing layer is the innermost ``forward`` frame of a
    ``paddle.nn.Layer`` in the traceback; its input is that call's first argument. Returns (the
    caller re-raises ``exc`` as it was) when the error is not Paddle's ``InvalidArgument`` or no
    layer can be found.
    """
    if "(InvalidArgument)" not in str(exc):
        return
    layer, inputs, tb = None, None, exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        candidate = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and isinstance(candidate, paddle.nn.Layer):
            names = frame.f_code.co_varnames
            layer = candidate
            inputs = frame.f_locals.get(names[1]) if frame.f_code.co_argcount > 1 else None
        tb = tb.tb_next
    if layer is None:
        return
    name = next((n for n, sub in module.named_sublayers(include_self=True) if sub is layer), None)
    shape = list(inputs.shape) if isinstance(inputs, paddle.Tensor) else None
    weight = getattr(layer, "weight", None)
    expected = ""
    if isinstance(layer, paddle.nn.Linear) and weight is not None:
        expected = f"; it expects [..., {weight.shape[0]}] (in_features={weight.shape[0]})"
    elif hasattr(layer, "_in_channels") and weight is not None:  # Conv1D/2D/3D and their transposes
        channels_last = str(getattr(layer, "_data_format", "NCHW")).endswith("C")
        spatial = ", ".join(("D", "H", "W")[3 - len(weight.shape[2:]):] if len(weight.shape) <= 5 else "...")
        dims = f"[N, {spatial}, {layer._in_channels}]" if channels_last else f"[N, {layer._in_channels}, {spatial}]"
        expected = f"; it expects {dims} (in_channels={layer._in_channels}, data_format={layer._data_format})"
    elif weight is not None:
        expected = f" (its weight has shape {list(weight.shape)})"
    first_line = str(exc).strip().splitlines()[0]
    raise ValueError(
        f"{type(module).__name__}.{where}: layer {name or '?'!r} ({type(layer).__name__}) got an input of shape "
        f"{shape}{expected}. Check the batch (e.g. channel count, image size) against the model. Paddle: {first_line}"
    ) from exc


def to_device(batch: Any, device: str) -> Any:
    """Move the batch's tensors to ``device`` (a no-op on CPU, where loaders already put them)."""
    if device == "cpu":
        return batch
    if isinstance(batch, paddle.Tensor):
        return batch if str(batch.place).lower().startswith("place(gpu") else batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
