"""The legacy-program ops the export emits while ``paddle.jit.save`` traces, and one graph query.

``append_quant_op`` (``quantize_linear`` / ``dequantize_linear``), ``append_round`` (``floor(x + 0.5)``),
``residual_conv_weights`` (the convolutions before a residual add that Paddle must not fuse),
``norms_after_convs`` (the batch norm right after each of them, where the barrier goes) and
``fused_unsigned_inputs`` (the quantized inputs that Paddle's conv + relu/relu6 fusion already
marks unsigned); see ``docs/export-format.md``.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = [
    "INT8_BITS", "append_quant_op", "append_round", "residual_conv_weights", "norms_after_convs",
    "fused_unsigned_inputs",
]

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


def _graph_index(ops: Sequence[Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """``(producer, consumers)``: the op writing each variable, and the ops reading it (once per read)."""
    producer: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = {}
    for op in ops:
        for names in op.inputs.values():
            for name in names:
                consumers.setdefault(name, []).append(op)
        for names in op.outputs.values():
            for name in names:
                producer[name] = op
    return producer, consumers


def residual_conv_weights(ops: Sequence[Any]) -> set[str]:
    """Weight variables of the ``conv2d`` ops that must keep an fp32 output before a residual add.

    The pattern is ``conv2d [-> scale] [-> bias add] [-> batch_norm] -> elementwise_add`` of two
    tensors computed from the input, each step the single consumer of the previous one (a
    ``scale`` is the barrier this function asks for; a bias add, one side computed from
    parameters only, is looked through). Paddle fuses such a conv with the add and quantizes the
    other input (``ResidualData``) on its own scale. That is what the simulation computes, and the
    conv may stay fused, when the other input is a ``dequantize_linear`` output (the residual
    block's quantized input, ``qtrainer.quant.transforms.residual``) and the add's output, through
    an optional ``relu``, is read by ``quantize_linear`` ops only (Paddle needs the output scale).
    Every other residual conv is returned. A conv's weight is the ``X`` of the
    ``dequantize_linear`` that feeds its ``Filter``.
    """
    producer, consumers = _graph_index(ops)
    computed: set[str] = set()  # depends on the input (the ops are in program order)
    for op in ops:
        if op.type == "feed" or any(name in computed for names in op.inputs.values() for name in names):
            computed.update(name for names in op.outputs.values() for name in names)

    def residual_add(var: str) -> tuple[Any, str] | None:
        """The residual add ``var`` flows into, and the add's other input."""
        users = consumers.get(var, [])
        if len(users) != 1:
            return None
        user = users[0]
        if user.type == "elementwise_add":
            others = [n for n in (*user.inputs.get("X", []), *user.inputs.get("Y", [])) if n != var]
            if others and all(n in computed for n in others):
                return user, others[0]
            return residual_add(user.outputs["Out"][0])  # a bias add
        if user.type == "batch_norm":
            return residual_add(user.outputs["Y"][0])
        if user.type == "scale":
            return residual_add(user.outputs["Out"][0])
        return None

    def quantized_readers_only(var: str) -> bool:
        users = consumers.get(var, [])
        if len(users) == 1 and users[0].type == "relu":
            users = consumers.get(users[0].outputs["Out"][0], [])
        return bool(users) and all(u.type == "quantize_linear" for u in users)

    def fuses(add: Any, other: str) -> bool:
        source = producer.get(other)
        return (source is not None and source.type == "dequantize_linear"
                and quantized_readers_only(add.outputs["Out"][0]))

    dequantized = {op.outputs["Y"][0]: op.inputs["X"][0] for op in ops if op.type == "dequantize_linear"}
    found = set()
    for op in ops:
        if op.type != "conv2d" or op.inputs["Filter"][0] not in dequantized:
            continue
        target = residual_add(op.outputs["Output"][0])
        if target is not None and not fuses(*target):
            found.add(dequantized[op.inputs["Filter"][0]])
    return found


def norms_after_convs(ops: Sequence[Any], weights: set[str]) -> dict[str, str]:
    """``{weight: batch-norm scale parameter}`` for the convolutions of ``weights`` read by one batch norm.

    The pattern is ``conv2d [-> scale(1.0)] -> batch_norm``, each output read by the next op only.
    The fp32-output barrier of such a convolution goes after the batch norm instead of between the
    two: Paddle then folds the batch norm into the int8 convolution (``conv_bn_fuse_pass`` needs
    them adjacent) and still does not fuse the add, which is what the barrier is for. The values
    equal the barrier-before-norm graph's, one fp32 batch norm fewer per convolution. ``weights``
    are the ``X`` of the ``dequantize_linear`` feeding each ``Filter``, as ``residual_conv_weights``
    returns them.
    """
    _, consumers = _graph_index(ops)
    dequantized = {op.outputs["Y"][0]: op.inputs["X"][0] for op in ops if op.type == "dequantize_linear"}

    def only_user(var: str) -> Any:
        users = consumers.get(var, [])
        return users[0] if len(users) == 1 else None

    found = {}
    for op in ops:
        weight = dequantized.get(op.inputs["Filter"][0]) if op.type == "conv2d" else None
        if weight not in weights:
            continue
        user = only_user(op.outputs["Output"][0])
        if user is not None and user.type == "scale":
            user = only_user(user.outputs["Out"][0])
        if user is not None and user.type == "batch_norm":
            found[weight] = user.inputs["Scale"][0]
    return found


#: Activations that Paddle fuses into a convolution and then counts as unsigned outputs
#: (``conv_activation_onednn_fuse_pass``, ``compute_propagate_scales_onednn_pass``).
FUSED_UNSIGNED_ACTIVATIONS = ("relu", "relu6")
_CONV_OPS = ("conv2d", "depthwise_conv2d")


def fused_unsigned_inputs(ops: Sequence[Any]) -> set[str]:
    """``Scale`` variables of the ``quantize_linear`` ops whose input Paddle itself will mark unsigned.

    The pattern is ``conv2d|depthwise_conv2d [-> batch_norm] -> relu|relu6 [-> relu] ->
    quantize_linear``, the convolution's and the batch norm's output each used by the next op only.
    Paddle folds the batch norm into the convolution (``conv_bn_fuse_pass``), fuses the activation
    into it (``conv_activation_onednn_fuse_pass``) and counts a convolution fused with relu/relu6 as
    an unsigned producer, so the quantized tensor is u8 without the export's no-op ``relu`` (the
    optional ``relu`` before the ``quantize_linear``). With that relu the fused convolution writes
    fp32 and a separate relu + quantize run on every such tensor; without it the convolution writes
    the same u8 codes itself. Anything else in between (a pool, reshape, add, clip, pad, or a
    convolution output used twice, which Paddle does not fuse) keeps the relu.
    """
    producer, consumers = _graph_index(ops)

    def only_output_of(name: str, types: Sequence[str]) -> Any:
        op = producer.get(name)
        return op if op is not None and op.type in types and len(consumers.get(name, ())) == 1 else None

    def from_fused_activation(name: str) -> bool:
        act = producer.get(name)
        if act is None or act.type not in FUSED_UNSIGNED_ACTIVATIONS:
            return False
        source = act.inputs["X"][0]
        norm = only_output_of(source, ("batch_norm",))
        if norm is not None:
            if source not in norm.outputs.get("Y", []):
                return False
            source = norm.inputs["X"][0]
        conv = only_output_of(source, _CONV_OPS)
        return conv is not None and source in conv.outputs.get("Output", [])

    found = set()
    for op in ops:
        if op.type != "quantize_linear":
            continue
        name = op.inputs["X"][0]
        noop = producer.get(name)
        if noop is not None and noop.type == "relu" and from_fused_activation(noop.inputs["X"][0]):
            found.add(op.inputs["Scale"][0])  # the export's no-op relu after the activation
        elif from_fused_activation(name):
            found.add(op.inputs["Scale"][0])
    return found
