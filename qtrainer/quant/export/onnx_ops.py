"""ONNX emitters of the plain Paddle ops (activations, elementwise, pooling, reshapes, matmul) for
``onnx_convert.ProgramToOnnx``: each handler takes the converter and one ``ProgramOp`` and emits
its nodes (``c.node``, ``c.value``, ``c.const``); ``CONST_FOLDABLE`` computes an op at conversion
time when its inputs are constants. Quantization and convolutions live in ``onnx_convert``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from qtrainer.quant.export.inference import ProgramOp

__all__ = ["OP_HANDLERS", "CONST_FOLDABLE", "onnx_pads"]


def _batch_norm(c: Any, op: ProgramOp) -> None:
    args = [c.value(c.inp(op, k)) for k in ("X", "Scale", "Bias", "Mean", "Variance")]
    c.node("BatchNormalization", args, [c.out(op, "Y")], epsilon=float(op.attrs.get("epsilon", 1e-5)))


def _unary(onnx_type: str):
    def handler(c: Any, op: ProgramOp) -> None:
        c.node(onnx_type, [c.value(c.inp(op))], [c.out(op)])
    return handler


def clip_bounds(c: Any, op: ProgramOp) -> tuple[float, float]:
    """``(min, max)`` of a ``relu6`` or ``clip`` op (unsupported when given as tensors)."""
    if op.type == "relu6":
        return 0.0, float(op.attrs.get("threshold", 6.0))
    if "Min" in op.inputs or "Max" in op.inputs:
        raise c.unsupported(op, "min/max given as tensors")
    return float(op.attrs.get("min", -math.inf)), float(op.attrs.get("max", math.inf))


def _clip(c: Any, op: ProgramOp) -> None:
    if id(op) in c.clamped_clips:  # already applied to the codes of the quantization before it
        c.node("Identity", [c.value(c.inp(op))], [c.out(op)])
        return
    low, high = clip_bounds(c, op)
    c.node("Clip", [c.value(c.inp(op)), c.const("clip.min", np.float32(low)), c.const("clip.max", np.float32(high))],
           [c.out(op)])


def _broadcast_y(c: Any, op: ProgramOp) -> str:
    """``Y`` of an elementwise op aligned as Paddle defines ``axis``: at ``axis`` of ``X``, trailing 1s."""
    x, y = c.inp(op, "X"), c.inp(op, "Y")
    axis = op.attrs.get("axis", -1)
    rx, ry = c.rank(x), c.rank(y)
    if axis in (-1, None) or rx is None or ry is None or rx == ry:
        return c.value(y)
    if ry > rx:
        raise c.unsupported(op, f"Y of rank {ry} broadcast into X of rank {rx} at axis {axis}")
    trailing = rx - axis - ry
    if trailing < 0:
        raise c.unsupported(op, f"axis={axis} does not fit Y of rank {ry} into X of rank {rx}")
    if trailing == 0:
        return c.value(y)
    if y in c.consts:
        return c.const(y, c.consts[y].reshape(c.consts[y].shape + (1,) * trailing))
    axes = c.const("axes", np.arange(ry, ry + trailing, dtype=np.int64))
    return c.node("Unsqueeze", [c.value(y), axes])


def _elementwise(onnx_type: str):
    def handler(c: Any, op: ProgramOp) -> None:
        c.node(onnx_type, [c.value(c.inp(op, "X")), _broadcast_y(c, op)], [c.out(op)])
    return handler


def _scale(c: Any, op: ProgramOp) -> None:
    if "ScaleTensor" in op.inputs:
        raise c.unsupported(op, "the scale given as a tensor")
    scale, bias = float(op.attrs.get("scale", 1.0)), float(op.attrs.get("bias", 0.0))
    x = c.value(c.inp(op))
    if scale == 1.0 and bias == 0.0:  # the export's barrier: nothing to compute
        c.names[c.out(op)] = x
        return
    if not op.attrs.get("bias_after_scale", True) and bias:
        x = c.node("Add", [x, c.const("bias", np.float32(bias))])
        bias = 0.0
    if scale != 1.0:
        x = c.node("Mul", [x, c.const("scale", np.float32(scale))])
    if bias:
        x = c.node("Add", [x, c.const("bias", np.float32(bias))])
    c.node("Identity", [x], [c.out(op)])


def _pool(c: Any, op: ProgramOp) -> None:
    attrs = op.attrs
    kind = attrs.get("pooling_type", "max")
    if kind not in ("max", "avg") or attrs.get("data_format", "NCHW") != "NCHW":
        raise c.unsupported(op, f"pooling_type={kind!r}, data_format={attrs.get('data_format')!r}")
    x, out = c.value(c.inp(op)), c.out(op)
    ksize = list(attrs.get("ksize", [1, 1]))
    if attrs.get("global_pooling") or (attrs.get("adaptive") and ksize == [1, 1]):
        c.node("GlobalMaxPool" if kind == "max" else "GlobalAveragePool", [x], [out])
        return
    if attrs.get("adaptive"):
        raise c.unsupported(op, f"adaptive pooling to {ksize} (only to 1x1 has an ONNX form)")
    kw = dict(kernel_shape=ksize, strides=list(attrs.get("strides", [1, 1])),
              ceil_mode=int(bool(attrs.get("ceil_mode", False))), **onnx_pads(c, op, attrs))
    if kind == "avg":
        kw["count_include_pad"] = 0 if attrs.get("exclusive", True) else 1
    c.node("MaxPool" if kind == "max" else "AveragePool", [x], [out], **kw)


def onnx_pads(c: Any, op: ProgramOp, attrs: dict) -> dict:
    """The ONNX padding attributes (``pads`` or ``auto_pad``) of a Paddle conv or pool op."""
    algorithm = attrs.get("padding_algorithm", "EXPLICIT")
    if algorithm == "SAME":
        return {"auto_pad": "SAME_UPPER"}
    pads = list(attrs.get("paddings", [0, 0]))
    if algorithm == "VALID":
        pads = [0, 0]
    if len(pads) == 2:
        return {"pads": [pads[0], pads[1], pads[0], pads[1]]}
    if len(pads) == 4:  # Paddle: top, bottom, left, right
        return {"pads": [pads[0], pads[2], pads[1], pads[3]]}
    raise c.unsupported(op, f"paddings={pads}")


def _reshape(c: Any, op: ProgramOp) -> None:
    if "Shape" in op.inputs or "ShapeTensor" in op.inputs:
        raise c.unsupported(op, "a shape given as a tensor")
    shape = c.const("shape", np.asarray(op.attrs.get("shape", []), np.int64))
    c.node("Reshape", [c.value(c.inp(op)), shape], [c.out(op)])


def _flatten(c: Any, op: ProgramOp) -> None:
    x, out = c.inp(op), c.out(op)
    rank = c.rank(x)
    start, stop = op.attrs.get("start_axis", 1), op.attrs.get("stop_axis", -1)
    if rank is None:
        raise c.unsupported(op, f"the rank of {x!r} is unknown")
    start, stop = start % rank, stop % rank
    if stop == rank - 1:
        shape = [0] * start + [-1]
    else:
        dims = c.shapes.get(out, [])
        if sum(1 for d in dims if d < 0) > 1:
            raise c.unsupported(op, f"flattening axes {start}..{stop} of a tensor with several free dims")
        shape = [0] * start + list(dims[start:])
    c.node("Reshape", [c.value(x), c.const("shape", np.asarray(shape, np.int64))], [out])


def _squeeze(c: Any, op: ProgramOp) -> None:
    axes = [int(a) for a in op.attrs.get("axes", [])]
    onnx_type = "Squeeze" if op.type == "squeeze2" else "Unsqueeze"
    if not axes and onnx_type == "Squeeze":
        c.node("Squeeze", [c.value(c.inp(op))], [c.out(op)])
        return
    c.node(onnx_type, [c.value(c.inp(op)), c.const("axes", np.asarray(axes, np.int64))], [c.out(op)])


def _transpose(c: Any, op: ProgramOp) -> None:
    c.node("Transpose", [c.value(c.inp(op))], [c.out(op)], perm=[int(a) for a in op.attrs["axis"]])


def _concat(c: Any, op: ProgramOp) -> None:
    if "AxisTensor" in op.inputs:
        raise c.unsupported(op, "the axis given as a tensor")
    c.node("Concat", [c.value(n) for n in op.inputs["X"]], [c.out(op)], axis=int(op.attrs.get("axis", 0)))


def _matmul(c: Any, op: ProgramOp) -> None:
    args = []
    for key, flag in (("X", "trans_x"), ("Y", "trans_y")):
        name = c.value(c.inp(op, key))
        if op.attrs.get(flag):
            rank = c.rank(c.inp(op, key))
            if rank is None or rank < 2:
                raise c.unsupported(op, f"{flag} on an input of unknown rank")
            perm = list(range(rank - 2)) + [rank - 1, rank - 2]
            name = c.node("Transpose", [name], perm=perm)
        args.append(name)
    c.node("MatMul", args, [c.out(op)])


def _hard_swish(c: Any, op: ProgramOp) -> None:
    a = op.attrs
    threshold, scale, offset = float(a.get("threshold", 6.0)), float(a.get("scale", 6.0)), float(a.get("offset", 3.0))
    x = c.value(c.inp(op))
    shifted = c.node("Add", [x, c.const("offset", np.float32(offset))])
    clipped = c.node("Clip", [shifted, c.const("min", np.float32(0)), c.const("max", np.float32(threshold))])
    product = c.node("Mul", [x, clipped])
    c.node("Div", [product, c.const("scale", np.float32(scale))], [c.out(op)])


def _hard_sigmoid(c: Any, op: ProgramOp) -> None:
    c.node("HardSigmoid", [c.value(c.inp(op))], [c.out(op)], alpha=float(op.attrs.get("slope", 0.1666667)),
           beta=float(op.attrs.get("offset", 0.5)))


def _swish(c: Any, op: ProgramOp) -> None:
    x = c.value(c.inp(op))
    beta = float(op.attrs.get("beta", 1.0))
    gate = c.node("Sigmoid", [x if beta == 1.0 else c.node("Mul", [x, c.const("beta", np.float32(beta))])])
    c.node("Mul", [x, gate], [c.out(op)])


def _dropout(c: Any, op: ProgramOp) -> None:
    """Inference dropout: the identity (``upscale_in_train``) or ``x * (1 - p)`` (``downgrade_in_infer``)."""
    x = c.value(c.inp(op))
    if op.attrs.get("dropout_implementation", "downgrade_in_infer") == "upscale_in_train":
        c.names[c.out(op)] = x
        return
    keep = 1.0 - float(op.attrs.get("dropout_prob", 0.5))
    c.node("Mul", [x, c.const("keep", np.float32(keep))], [c.out(op)])


def _softmax(c: Any, op: ProgramOp) -> None:
    c.node("Softmax", [c.value(c.inp(op))], [c.out(op)], axis=int(op.attrs.get("axis", -1)))


def _fold_reshape(c: Any, op: ProgramOp) -> np.ndarray:
    value = c.consts[c.inp(op)]
    shape = [value.shape[i] if d == 0 else d for i, d in enumerate(op.attrs.get("shape", []))]
    return value.reshape(shape)


def _fold_scale(c: Any, op: ProgramOp) -> np.ndarray:
    value = c.consts[c.inp(op)]
    scale, bias = op.attrs.get("scale", 1.0), op.attrs.get("bias", 0.0)
    out = value * scale + bias if op.attrs.get("bias_after_scale", True) else (value + bias) * scale
    return out.astype(value.dtype)


#: ONNX emitters of the Paddle ops that are not quantization or convolution, by op type.
OP_HANDLERS = {
    "batch_norm": _batch_norm, "relu": _unary("Relu"), "sigmoid": _unary("Sigmoid"), "floor": _unary("Floor"),
    "relu6": _clip, "clip": _clip, "elementwise_add": _elementwise("Add"), "elementwise_mul": _elementwise("Mul"),
    "scale": _scale, "pool2d": _pool, "reshape2": _reshape, "flatten_contiguous_range": _flatten,
    "squeeze2": _squeeze, "unsqueeze2": _squeeze, "transpose2": _transpose, "concat": _concat,
    "matmul_v2": _matmul, "dropout": _dropout, "softmax": _softmax,
    "hard_swish": _hard_swish, "hard_sigmoid": _hard_sigmoid, "swish": _swish,
}


#: Ops computed at conversion time when every input is a constant (a bias reshaped for its add).
CONST_FOLDABLE = {"reshape2": _fold_reshape, "scale": _fold_scale}
