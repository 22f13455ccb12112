"""The legacy-program ops the export emits while ``paddle.jit.save`` traces, and one graph query.

``append_quant_op`` (``quantize_linear`` / ``dequantize_linear``), ``append_round`` (``floor(x + 0.5)``)
and ``residual_conv_weights`` (the convolutions whose output goes only to a residual add; see
``docs/export-format.md``).
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["INT8_BITS", "append_quant_op", "append_round", "residual_conv_weights"]

INT8_BITS = 8


def append_quant_op(op_type: str, x, scale, zero_point, quant_axis: int, unsigned: bool):
    """Append one legacy ``quantize_linear`` / ``dequantize_linear`` op to the traced program."""
    from paddle.base.layer_helper import LayerHelper

    helper = LayerHelper(op_type)
    out = helper.create_variable_for_type_inference(dtype="float32")
    helper.append_op(
        type=op_type,
        inputs={"X": [x], "Scale": [scale], "ZeroPoint": [zero_point]},
        outputs={"Y": [out]},
        attrs={
            "quant_axis": int(quant_axis),
            "bit_length": INT8_BITS,
            # oneDNN ignores qmin/qmax; Paddle's own CPU kernels use them
            "qmin": 0 if unsigned else -128,
            "qmax": 255 if unsigned else 127,
            "round_type": 0,
            "is_test": True,
            "only_observer": False,
        },
    )
    return out


def append_round(x):
    """``floor(x + 0.5)`` as legacy ops (``paddle.round``/``floor`` build PIR ops only).

    Not Paddle's ``round`` op: its CPU kernel took 0.5 s on an 8x32x112x112 tensor where ``floor``
    takes a few ms. Differs from the simulation's rounding only at exact ties.
    """
    from paddle.base.layer_helper import LayerHelper

    helper = LayerHelper("floor")
    out = helper.create_variable_for_type_inference(dtype=x.dtype)
    helper.append_op(type="floor", inputs={"X": [x + 0.5]}, outputs={"Out": [out]})
    return out


def residual_conv_weights(ops: Sequence[Any]) -> set[str]:
    """Weight variables of the ``conv2d`` ops whose output goes only to a residual add.

    The pattern is ``conv2d [-> bias add] [-> batch_norm] -> elementwise_add`` of two tensors
    computed from the input, each step the single consumer of the previous one. A bias add (one
    side computed from parameters only) is looked through. A conv's weight is the ``X`` of the
    ``dequantize_linear`` that feeds its ``Filter``.
    """
    consumers: dict[str, list[Any]] = {}
    computed: set[str] = set()  # depends on the input (the ops are in program order)
    for op in ops:
        inputs = [name for names in op.inputs.values() for name in names]
        for name in inputs:
            consumers.setdefault(name, []).append(op)
        if op.type == "feed" or any(name in computed for name in inputs):
            computed.update(name for names in op.outputs.values() for name in names)

    def feeds_residual_add(var: str) -> bool:
        users = consumers.get(var, [])
        if len(users) != 1:
            return False
        user = users[0]
        if user.type == "elementwise_add":
            others = [n for n in (*user.inputs.get("X", []), *user.inputs.get("Y", [])) if n != var]
            if others and all(n in computed for n in others):
                return True
            return feeds_residual_add(user.outputs["Out"][0])  # a bias add
        return user.type == "batch_norm" and feeds_residual_add(user.outputs["Y"][0])

    dequantized = {op.outputs["Y"][0]: op.inputs["X"][0] for op in ops if op.type == "dequantize_linear"}
    return {
        dequantized[op.inputs["Filter"][0]]
        for op in ops
        if op.type == "conv2d" and op.inputs["Filter"][0] in dequantized
        and feeds_residual_add(op.outputs["Output"][0])
    }
