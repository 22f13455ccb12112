"""Convert the int8 Paddle program written by the export to an ONNX QDQ model (``onnx.convert_to_onnx``).

Our own converter, not paddle2onnx (which aborts the process on these quantized programs): it walks
``inference.read_program_ops`` of ``prefix.pdmodel`` with ``inference.read_params`` and emits one or
a few ONNX nodes per Paddle op. The rules that make onnxruntime run every int8 layer with an int8
kernel (measured on onnxruntime 1.32; see ``docs/export-format.md`` and ``qtrainer.quant.export.onnx``):

* ``quantize_linear``/``dequantize_linear`` -> ``QuantizeLinear``/``DequantizeLinear``; an activation's
  ONNX scale is ``S / 127`` (signed) or ``S / 255`` (u8), stored u8 with zero point 128 (signed: the
  same values as s8, see ``quant_consts``) or 0; an int8 weight stays int8 codes
  with a per-output-channel ``DequantizeLinear`` (scale ``S_c / 127``, axis 0).
* A convolution's bias add and batch norm are folded into it (per-channel weight scale times
  ``|gamma / sqrt(var + eps)|``, codes times its sign: exact), the ``scale(1.0)`` barrier is dropped,
  and the bias of an int8 convolution becomes an int32 ``DequantizeLinear`` with scale
  ``x_scale * w_scale``, the form onnxruntime's QDQ fusion quantizes into ``QLinearConv``.
* onnxruntime fuses ``DQ -> Conv -> Q`` only: a convolution whose output is not quantized runs in
  float. Where the conv output reaches a ``quantize_linear`` through ops that commute with it (relu,
  relu6, max pool, reshapes) the same Q/DQ pair is put right after the convolution (the values do
  not change). Before a residual add or another float consumer, ``float_outputs`` decides.
* A ``Linear`` (traced as reshape -> 1x1 conv -> reshape) becomes ``Flatten -> Q -> DQ -> Gemm``:
  with an int32 bias onnxruntime runs it as ``QGemm`` also with a float output (the logits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from qtrainer.quant.export.inference import ProgramOp
from qtrainer.quant.export.onnx_ops import CONST_FOLDABLE, OP_HANDLERS, clip_bounds, onnx_pads

__all__ = ["FLOAT_OUTPUTS", "ProgramToOnnx"]

#: What to do with an int8 convolution whose output the program keeps float (a residual add, an
#: average pool, the model output): ``'int8'`` quantizes it anyway (s8, the scale of the next
#: quantized tensor, so onnxruntime runs ``QLinearConv``), ``'float'`` leaves it (a float ``Conv``).
FLOAT_OUTPUTS = ("int8", "float")
#: Ops through which a quantize_linear commutes with the values: a Q/DQ pair moved before them
#: changes no value (rounding is monotone, and rounding after a clamp to any bound equals rounding
#: after that clamp of the already rounded value: relu, relu6, and the explicit clip to the
#: threshold that the self-check puts before a quantize that clips on purpose).
_COMMUTING = ("relu", "relu6", "clip", "reshape2", "flatten_contiguous_range", "squeeze2", "unsqueeze2",
              "transpose2")
_CONV_TYPES = ("conv2d", "depthwise_conv2d")
_BIAS_LIMIT = 2**31 - 1


@dataclass
class _Weight:
    """An int8 weight: codes and the ONNX per-channel scale (``S_c / 127``) along ``axis``."""

    codes: np.ndarray
    scale: np.ndarray
    axis: int


@dataclass
class _Quant:
    """An activation quantization: ONNX scale, unsigned (u8) or signed (s8), and the range its codes
    are clamped to (``codes``: an explicit clip of the program absorbed into the integer codes)."""

    scale: float
    unsigned: bool
    codes: tuple[int, int] | None = None


@dataclass
class _Pair:
    """A quantize_linear -> dequantize_linear pair: the ONNX value quantized, scale, zero point."""

    source: str
    scale: str
    zero: str
    quant: _Quant


@dataclass
class _Report:
    int8_convs: list[str] = field(default_factory=list)
    quantized_outputs: dict[str, str] = field(default_factory=dict)  # conv output -> why
    float_outputs: list[str] = field(default_factory=list)  # int8 convs left float (onnxruntime: float Conv)
    gemm_float_outputs: list[str] = field(default_factory=list)  # int8 Linears with a float output (QGemm)
    folded_batch_norms: int = 0
    merged_quantizers: int = 0  # duplicate QuantizeLinear nodes merged (merge_duplicate_quantizers)
    # parameter -> what adding it moves the folded bias of an int8 conv onto its int32 grid (bias_shifts)
    bias_shifts: dict[str, np.ndarray] = field(default_factory=dict)


class ProgramToOnnx:
    """One conversion: the Paddle ops in, ONNX nodes and initializers out (``build``)."""

    def __init__(self, ops: Sequence[ProgramOp], params: dict[str, np.ndarray],
                 shapes: dict[str, list[int]], dtypes: dict[str, Any], float_outputs: str = "int8",
                 thresholds: dict[str, float] | None = None) -> None:
        if float_outputs not in FLOAT_OUTPUTS:
            raise ValueError(f"float_outputs={float_outputs!r} is not valid: use one of {FLOAT_OUTPUTS}")
        import onnx

        self.onnx = onnx
        self.ops = list(ops)
        self.shapes = shapes
        self.dtypes = dtypes
        self.float_outputs = float_outputs
        self.thresholds = dict(thresholds or {})  # conv output -> calibrated abs-max (float_outputs='int8')
        self.nodes: list[Any] = []
        self.inits: dict[str, np.ndarray] = {}
        self.inputs: list[Any] = []
        self.outputs: list[tuple[int, Any]] = []
        self.weights: dict[str, _Weight] = {}  # dequantize_linear output -> int8 weight (emitted lazily)
        self.pairs: dict[str, _Pair] = {}  # activation quantize_/dequantize_linear output -> its pair
        self.consts: dict[str, np.ndarray] = dict(params)  # parameters and values computed from them only
        self.param_names = frozenset(params)
        self.names: dict[str, str] = {}  # Paddle variable -> ONNX value (where they differ)
        self.done: set[int] = set()
        self.clamped_clips: set[int] = set()  # clip ops applied to integer codes instead (see _output_quant)
        self.report = _Report()
        self.consumers: dict[str, list[ProgramOp]] = {}
        self.producers: dict[str, ProgramOp] = {}
        for op in self.ops:
            for names in op.inputs.values():
                for name in names:
                    self.consumers.setdefault(name, []).append(op)
            for names in op.outputs.values():
                for name in names:
                    self.producers[name] = op
        self._uid = 0

    # ------------------------------------------------------------------ small helpers
    def source_param(self, var: str) -> str | None:
        """The parameter ``var`` is, or is a reshape of (F.conv2d's bias arrives through a reshape2)."""
        for _ in range(4):
            if var in self.param_names:
                return var
            op = self.producers.get(var)
            if op is None or op.type not in ("reshape2", "unsqueeze2", "squeeze2"):
                return None
            var = self.inp(op)
        return None

    def fresh(self, hint: str) -> str:
        self._uid += 1
        return f"{hint}__{self._uid}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.fresh(hint)
        self.inits[name] = np.asarray(value)
        return name

    def node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | None = None, **attrs) -> str:
        outputs = list(outputs) if outputs is not None else [self.fresh(op_type.lower())]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outputs, **attrs))
        return outputs[0]

    def value(self, var: str) -> str:
        """The ONNX value of a Paddle variable (an int8 weight or a constant is emitted on first use)."""
        if var in self.names:
            return self.names[var]
        if var in self.weights:
            weight = self.weights[var]
            self.names[var] = self._dequantize_weight(var, weight)
            return self.names[var]
        if var in self.consts:
            self.names[var] = self.const(var, self.consts[var])
            return self.names[var]
        return var

    def _dequantize_weight(self, hint: str, weight: _Weight) -> str:
        zero = np.zeros(weight.scale.shape, np.int8)
        return self.node("DequantizeLinear", [self.const(hint + ".codes", weight.codes),
                                              self.const(hint + ".scale", weight.scale.astype(np.float32)),
                                              self.const(hint + ".zero", zero)], axis=weight.axis)

    def only_user(self, var: str) -> ProgramOp | None:
        users = self.consumers.get(var, [])
        return users[0] if len(users) == 1 else None

    def rank(self, var: str) -> int | None:
        if var in self.consts:
            return self.consts[var].ndim
        shape = self.shapes.get(var)
        return None if shape is None else len(shape)

    @staticmethod
    def out(op: ProgramOp, key: str = "Out") -> str:
        return op.outputs[key][0]

    @staticmethod
    def inp(op: ProgramOp, key: str = "X") -> str:
        return op.inputs[key][0]

    def unsupported(self, op: ProgramOp, why: str = "") -> ValueError:
        outs = ", ".join(n for names in op.outputs.values() for n in names) or "none"
        return ValueError(
            f"cannot convert Paddle op {op.type!r} (output {outs}) to ONNX{': ' + why if why else ''}; "
            f"supported ops: {', '.join(sorted(_HANDLERS))} (plus conv + bias/batch_norm folding)"
        )

    # ------------------------------------------------------------------ the walk
    def build(self) -> None:
        """Translate every op (constants first: a bias is reshaped after the conv that adds it)."""
        for op in self.ops:
            inputs = [n for names in op.inputs.values() for n in names]
            if op.type in CONST_FOLDABLE and inputs and all(n in self.consts for n in inputs):
                self.consts[self.out(op)] = CONST_FOLDABLE[op.type](self, op)
                self.absorbed(op)
        for op in self.ops:
            if id(op) in self.done:
                continue
            handler = _HANDLERS.get(op.type)
            if handler is None:
                raise self.unsupported(op)
            handler(self, op)
        self.merge_duplicate_quantizers()

    def merge_duplicate_quantizers(self) -> None:
        """One ``QuantizeLinear`` per tensor and grid: the Paddle program has a pair per consumer layer.

        Two layers reading one tensor (a projection block's first convolution and its shortcut) each
        bring a quantize op with the same (unified) scale. Two identical Q nodes on a relu's output
        keep onnxruntime from removing the relu and fusing the residual add before it into
        ``QLinearAdd`` (ResNet18: 4 of 8 adds stayed float); one Q read by both dequantize ops fuses.
        """
        first: dict[tuple, str] = {}
        renamed: dict[str, str] = {}
        kept = []
        for node in self.nodes:
            node_inputs = [renamed.get(name, name) for name in node.input]
            del node.input[:]
            node.input.extend(node_inputs)
            if node.op_type == "QuantizeLinear" and all(name in self.inits for name in node.input[1:]):
                key = (node.input[0],) + tuple(self.inits[name].tobytes() + str(self.inits[name].dtype).encode()
                                               for name in node.input[1:])
                if key in first:
                    renamed[node.output[0]] = first[key]
                    continue
                first[key] = node.output[0]
            kept.append(node)
        self.nodes = kept
        self.report.merged_quantizers = len(renamed)

    def absorbed(self, op: ProgramOp) -> None:
        self.done.add(id(op))

    # ------------------------------------------------------------------ quantization
    def quant_of(self, op: ProgramOp) -> _Quant:
        attrs = op.attrs
        if attrs.get("bit_length", 8) != 8:
            raise self.unsupported(op, f"bit_length={attrs.get('bit_length')} (only 8-bit ops have an ONNX form)")
        scale = np.asarray(self.consts[self.inp(op, "Scale")], np.float64).reshape(-1)
        if scale.size != 1:
            raise self.unsupported(op, f"a per-channel activation scale ({scale.size} values)")
        unsigned = attrs.get("qmin", -128) == 0
        return _Quant(float(scale[0]) / (255.0 if unsigned else 127.0), unsigned)

    def quant_consts(self, quant: _Quant) -> tuple[str, str]:
        """Scale and zero point of an activation Q/DQ: u8 with zero point 0 (unsigned) or 128 (signed).

        A signed tensor is stored as u8 with zero point 128 (the same values as s8 with 0): onnxruntime
        1.32 on x86 did not fuse ``DQ -> Conv -> Q(s8)`` into ``QLinearConv`` when that Q's output is
        read twice (a MobileNetV2 projection conv read by the next block and the residual add: 15 of
        53 convs stayed float), and fused all of them with u8 + 128.
        """
        scale = self.const("q.scale", np.float32(quant.scale))
        zero = self.const("q.zero", np.asarray(0 if quant.unsigned else 128, np.uint8))
        return scale, zero

    def emit_pair(self, x: str, quant: _Quant, output: str | None = None) -> str:
        """``QuantizeLinear -> DequantizeLinear`` of ``x``; returns the dequantized value."""
        scale, zero = self.quant_consts(quant)
        q = self.node("QuantizeLinear", [x, scale, zero])
        if quant.codes is not None:  # on the u8 codes: onnxruntime keeps QLinearConv -> Clip -> QLinearConv
            low, high = (self.const("codes.min", np.uint8(v)) for v in quant.codes)
            q = self.node("Clip", [q, low, high])
        out = self.node("DequantizeLinear", [q, scale, zero], [output] if output else None)
        self.pairs[out] = _Pair(x, scale, zero, quant)
        return out


# ---------------------------------------------------------------------- op handlers
def _feed(c: ProgramToOnnx, op: ProgramOp) -> None:
    name = c.out(op)
    shape = [d if d >= 0 else None for d in c.shapes.get(name, [])]
    elem = c.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(c.dtypes.get(name, np.float32)))
    c.inputs.append((op.attrs.get("col", len(c.inputs)), c.onnx.helper.make_tensor_value_info(name, elem, shape)))


def _fetch(c: ProgramToOnnx, op: ProgramOp) -> None:
    var = c.inp(op)
    name = c.value(var)
    if name != var or name in c.inits:  # an output must be a node output named as the Paddle variable
        name = c.node("Identity", [name], [var + ".out"])
    elem = c.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(c.dtypes.get(var, np.float32)))
    shape = [d if d >= 0 else None for d in c.shapes.get(var, [])] or None
    c.outputs.append((op.attrs.get("col", len(c.outputs)), c.onnx.helper.make_tensor_value_info(name, elem, shape)))


def _quantize(c: ProgramToOnnx, op: ProgramOp) -> None:
    """An activation pair: ``quantize_linear`` here, its ``dequantize_linear`` right after."""
    quant = c.quant_of(op)
    axis = op.attrs.get("quant_axis", -1)
    if axis not in (-1, None):
        raise c.unsupported(op, f"quant_axis={axis} on an activation")
    scale, zero = c.quant_consts(quant)
    source = c.value(c.inp(op))
    c.node("QuantizeLinear", [source, scale, zero], [c.out(op, "Y")])
    c.pairs[c.out(op, "Y")] = _Pair(source, scale, zero, quant)


def _dequantize(c: ProgramToOnnx, op: ProgramOp) -> None:
    x = c.inp(op)
    if x in c.consts:  # an int8 weight: kept for the convolution that reads it
        codes = c.consts[x]
        if codes.dtype != np.int8:
            raise c.unsupported(op, f"a constant input of dtype {codes.dtype} (int8 weight codes expected)")
        if op.attrs.get("bit_length", 8) != 8:
            raise c.unsupported(op, f"bit_length={op.attrs.get('bit_length')}")
        scale = np.asarray(c.consts[c.inp(op, "Scale")], np.float64).reshape(-1) / 127.0
        axis = op.attrs.get("quant_axis", 0)
        c.weights[c.out(op, "Y")] = _Weight(codes, scale, 0 if scale.size == 1 else axis)
        return
    pair = c.pairs.get(x)
    if pair is None:
        raise c.unsupported(op, f"its input {x!r} does not come from a quantize_linear")
    c.node("DequantizeLinear", [x, pair.scale, pair.zero], [c.out(op, "Y")])
    c.pairs[c.out(op, "Y")] = pair


@dataclass
class _Folded:
    """What follows a convolution and is folded into it: ``out = conv(x, w) * factor + bias``."""

    output: str
    factor: np.ndarray
    bias: np.ndarray | None
    batch_norms: int = 0
    shift: str | None = None  # a parameter added last to the bias (batch norm beta, bias add): moves it as is


# ---------------------------------------------------------------------- convolutions
def _channel_vector(c: ProgramToOnnx, add: ProgramOp, other: str, channels: int) -> np.ndarray | None:
    """The constant ``other`` of a bias add as a per-output-channel vector, or None if it is not one."""
    value = c.consts.get(other)
    if value is None or value.size != channels:
        return None
    axis = add.attrs.get("axis", -1)
    shape = tuple(value.shape)
    if (axis in (-1, None) and shape in ((1, channels, 1, 1), (channels, 1, 1))) or (axis == 1 and value.ndim == 1):
        return value.reshape(-1).astype(np.float64)
    return None


def _fold_followers(c: ProgramToOnnx, conv: ProgramOp, channels: int, codes: np.ndarray | None) -> _Folded:
    """Absorb the ``scale(1.0)`` barrier, bias adds and batch norms that only this conv's output reads."""
    folded = _Folded(conv.outputs["Output"][0], np.ones(channels), None)
    while True:
        user = c.only_user(folded.output)
        if user is None:
            return folded
        if user.type == "scale" and user.attrs.get("scale", 1.0) == 1.0 and user.attrs.get("bias", 0.0) == 0.0 \
                and "ScaleTensor" not in user.inputs:
            pass  # the export's barrier: a no-op here
        elif user.type == "elementwise_add":
            other = [n for n in (c.inp(user, "X"), c.inp(user, "Y")) if n != folded.output]
            vector = _channel_vector(c, user, other[0], channels) if len(other) == 1 else None
            if vector is None:
                return folded
            folded.bias = vector if folded.bias is None else folded.bias + vector
            folded.shift = c.source_param(other[0])
        elif user.type == "batch_norm":
            keys = ("Scale", "Bias", "Mean", "Variance")
            if not all(c.inp(user, k) in c.consts for k in keys):
                return folded
            gamma, beta, mean, var = (c.consts[c.inp(user, k)].astype(np.float64).reshape(-1) for k in keys)
            g = gamma / np.sqrt(var + float(user.attrs.get("epsilon", 1e-5)))
            factor = folded.factor * g
            if codes is not None and np.any((factor < 0) & np.any(codes.reshape(channels, -1) == -128, axis=1)):
                return folded  # -(-128) is not an int8 code: this batch norm stays a BatchNormalization
            bias = np.zeros(channels) if folded.bias is None else folded.bias
            folded.factor, folded.bias = factor, (bias - mean) * g + beta
            folded.shift = c.source_param(c.inp(user, "Bias"))
            folded.batch_norms += 1
            c.absorbed(user)
            folded.output = user.outputs["Y"][0]
            continue
        else:
            return folded
        c.absorbed(user)
        folded.output = c.out(user)


def _output_quant(c: ProgramToOnnx, var: str, linear: bool) -> tuple[_Quant | None, str]:
    """The quantization to put right after an int8 conv writing ``var``, and why (``None``: none).

    A ``Linear`` (a ``Gemm``) needs none: onnxruntime runs ``DQ -> Gemm`` with an int32 bias as
    ``QGemm`` with a float output, so it gets one only where that changes no value.
    """
    users = c.consumers.get(var, [])
    if users and all(u.type == "quantize_linear" for u in users):
        return None, "quantized"
    chain, name, clips = [], var, []
    while True:
        user = c.only_user(name)
        if user is None:
            break
        if user.type == "quantize_linear":
            return _clamped(c, c.quant_of(user), clips), "commutes: " + " -> ".join(chain)
        if user.type in ("clip", "relu6"):
            clips.append(user)
        max_pool = user.type == "pool2d" and user.attrs.get("pooling_type") == "max"
        if user.type not in _COMMUTING and not max_pool:
            break
        chain.append(user.type)
        name = c.out(user)
    if linear:
        return None, "float output (QGemm)"
    if c.float_outputs == "float":
        return None, "float"
    if var in c.thresholds:
        return _Quant(c.thresholds[var] / 127.0, unsigned=False), "int8 (s8, calibrated abs-max)"
    scale = _next_threshold(c, var)
    if scale is None:
        return None, "float (no quantized tensor after it)"
    return _Quant(scale / 127.0, unsigned=False), "int8 (s8 on the next threshold)"


def _clamped(c: ProgramToOnnx, quant: _Quant, clips: list[ProgramOp]) -> _Quant:
    """``quant`` with the clips (and relu6) between a conv and its quantize applied to the codes.

    Rounding commutes with a clip (``round(clip(x, lo, hi) / s) == clip(round(x / s), round(lo / s),
    round(hi / s))``), so the pair after the conv clamps its codes, and each clip becomes an
    ``Identity``. A float ``Clip`` stays between a ``DequantizeLinear`` and a ``QuantizeLinear``
    unless the Q's range lies inside it, and on the headroom grid it does not: with the explicit
    clips every layer of MobileNetV1 (224 px) made it run 1.4x slower, and MobileNetV2's 35 relu6
    ran in float (0.88x onnxruntime fp32 on AVX2); on the codes, onnxruntime runs
    ``QLinearConv -> Clip(uint8) -> QLinearConv``. A clamp to all 256 codes is left out: OpenVINO
    does not fold a ``Clip`` between ``QuantizeLinear`` and ``DequantizeLinear`` into its
    FakeQuantize (MobileNetV2 with ``target="vnni"``: 34 such no-op clamps, 13% slower than NNCF).
    """
    if not clips:
        return quant
    zero = 0 if quant.unsigned else 128

    def code(value: float) -> int:
        return int(np.clip(np.round(value / quant.scale) + zero, 0, 255))

    low, high = 0, 255
    for op in clips:
        lowest, highest = clip_bounds(c, op)
        low, high = max(low, code(lowest)), min(high, code(highest))
        c.clamped_clips.add(id(op))
    if (low, high) == (0, 255):  # the quantize saturates there anyway (a relu6 at 6 = 255 codes)
        return _Quant(quant.scale, quant.unsigned)
    return _Quant(quant.scale, quant.unsigned, (low, max(low, high)))


def _next_threshold(c: ProgramToOnnx, var: str, limit: int = 12) -> float | None:
    """The largest Paddle threshold ``S`` of the nearest ``quantize_linear`` ops downstream of ``var``."""
    frontier, seen = [var], {var}
    for _ in range(limit):
        found, nxt = [], []
        for name in frontier:
            for user in c.consumers.get(name, []):
                if user.type == "quantize_linear":
                    found.append(float(np.max(c.consts[c.inp(user, "Scale")])))
                else:
                    for out in (n for names in user.outputs.values() for n in names):
                        if out not in seen:
                            seen.add(out)
                            nxt.append(out)
        if found:
            return max(found)
        frontier = nxt
    return None


def emit_conv(c: ProgramToOnnx, op: ProgramOp) -> None:
    """A conv2d / depthwise_conv2d with its folded followers; int8 when its weight and input are quantized."""
    attrs = op.attrs
    if attrs.get("data_format", "NCHW") not in ("NCHW", "AnyLayout"):
        raise c.unsupported(op, f"data_format={attrs.get('data_format')!r} (NCHW only)")
    x, f = op.inputs["Input"][0], op.inputs["Filter"][0]
    weight = c.weights.get(f)
    if weight is None and f not in c.consts:
        raise c.unsupported(op, f"its filter {f!r} is neither a parameter nor an int8 weight")
    codes = weight.codes if weight is not None else None
    channels = (codes if codes is not None else c.consts[f]).shape[0]
    folded = _fold_followers(c, op, channels, codes)
    c.report.folded_batch_norms += folded.batch_norms
    sign = np.where(folded.factor < 0, -1, 1)
    pair = c.pairs.get(x)
    int8 = weight is not None and pair is not None
    if weight is not None:
        scale = np.broadcast_to(weight.scale, (channels,)) * np.abs(folded.factor)
        scale = np.where(scale > 0, scale, np.broadcast_to(weight.scale, (channels,)))
        new_codes = (codes.astype(np.int16) * sign.reshape(-1, *([1] * (codes.ndim - 1)))).astype(np.int8)
        new_codes[folded.factor == 0] = 0
        weight = _Weight(new_codes, scale, 0)
    else:
        w = c.consts[f].astype(np.float64) * folded.factor.reshape(-1, *([1] * (c.consts[f].ndim - 1)))
    kw = dict(strides=list(attrs.get("strides", [1, 1])), dilations=list(attrs.get("dilations", [1, 1])),
              group=int(attrs.get("groups", 1)), **onnx_pads(c, op, attrs))
    linear = int8 and _is_linear(c, x, codes, kw)
    inputs = [c.value(x)]
    if linear:  # Flatten before the input's Q/DQ: onnxruntime fuses only DQ -> Gemm
        flat = c.node("Flatten", [pair.source], axis=1)
        inputs = [c.emit_pair(flat, pair.quant)]
        weight = _Weight(weight.codes.reshape(channels, -1), weight.scale, 0)
    if weight is not None:
        inputs.append(c._dequantize_weight(f, weight))
    else:
        inputs.append(c.const(f, w.astype(np.float32)))
    if folded.bias is not None:
        inputs.append(_bias(c, f, folded.bias, pair.quant.scale * weight.scale if int8 else None,
                            None if linear else folded.shift))
    quant, why = _output_quant(c, folded.output, linear) if int8 else (None, "float conv")
    if int8:
        c.report.int8_convs.append(folded.output)
        if quant is not None or why == "quantized":
            c.report.quantized_outputs[folded.output] = why
        elif linear:
            c.report.gemm_float_outputs.append(folded.output)
        else:
            c.report.float_outputs.append(folded.output)
    raw = c.fresh("conv") if (quant is not None or linear) else folded.output
    if linear:
        raw = c.node("Gemm", inputs, [raw], transB=1)
    else:
        c.node("Conv", inputs, [raw], **kw)
    if quant is not None:
        raw = c.emit_pair(raw, quant, None if linear else folded.output)
    if linear:
        c.node("Reshape", [raw, c.const("shape", np.asarray([-1, channels, 1, 1], np.int64))], [folded.output])


def _is_linear(c: ProgramToOnnx, x: str, codes: np.ndarray, kw: dict) -> bool:
    """A Linear traced as a 1x1 convolution on an ``[N, C, 1, 1]`` tensor (see ``layers.Int8Linear``)."""
    shape = c.shapes.get(x, [])
    return (codes.shape[2:] == (1, 1) and list(shape[2:]) == [1, 1] and kw["group"] == 1
            and kw["strides"] == [1, 1] and kw.get("pads", [0] * 4) == [0] * 4)


def _bias(c: ProgramToOnnx, hint: str, bias: np.ndarray, scale: np.ndarray | None, shift: str | None = None) -> str:
    """The bias input: int32 codes + DequantizeLinear (scale ``x_scale * w_scale``) for an int8 conv.

    The rounding moves each channel's output by up to half a step of that grid, a constant that the
    next quantization turns into flipped codes (trained MobileNetV1: 1.2% of top-1 answers).
    ``shift`` (the parameter added last to the bias) records what would put the model's bias on
    the grid (``report.bias_shifts``; ``bias_grid.align_biases`` applies it). A ``Linear``'s float
    logits keep the rounding (no next quantization: at most half a step of its grid).
    """
    if scale is not None:
        scale = scale.astype(np.float32)  # the codes are rounded on the scale the runtime reads
        codes = np.round(bias / scale.astype(np.float64))
        if np.all(np.abs(codes) <= _BIAS_LIMIT) and np.all(scale > 0):
            if shift is not None:
                c.report.bias_shifts[shift] = codes * scale.astype(np.float64) - bias
            return c.node("DequantizeLinear", [c.const(hint + ".bias", codes.astype(np.int32)),
                                               c.const(hint + ".bias_scale", scale),
                                               c.const(hint + ".bias_zero", np.zeros(scale.shape, np.int32))], axis=0)
    return c.const(hint + ".bias", bias.astype(np.float32))


_HANDLERS = {
    "feed": _feed, "fetch": _fetch, "quantize_linear": _quantize, "dequantize_linear": _dequantize,
    "conv2d": emit_conv, "depthwise_conv2d": emit_conv, **OP_HANDLERS,
}
