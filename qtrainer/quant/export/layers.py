"""The layers that stand for the quantized layers in the export copy (what ``paddle.jit.save`` traces).

``Int8Conv2D`` / ``Int8Linear`` (int8 deployment), ``FakeQuantConv2D`` / ``FakeQuantLinear`` (the
self-check's fallback: float kernels on the simulated values), ``FrozenActQuanter`` (a fixed
activation threshold in the working copy). In dynamic mode each runs the quanted layer it stands
for (the simulation); while traced it appends the deployment ops (``docs/export-format.md``).
"""
from __future__ import annotations

import numpy as np
import paddle
from paddle import nn
import paddle.nn.functional as F

from qtrainer.quant.base import Quanter, qmax_for_bits
from qtrainer.quant.export.program import FUSED_UNSIGNED_ACTIVATIONS, append_quant_op, append_round
from qtrainer.quant.export.report import LayerExport
from qtrainer.quant.quanters.fake_quant import fake_quant
from qtrainer.quant.transforms.wrap import QuantedLayer

__all__ = ["Int8Conv2D", "Int8Linear", "FakeQuantConv2D", "FakeQuantLinear", "FrozenActQuanter",
           "INT8_TYPES", "FAKE_QUANT_TYPES"]


class _ExportLayer(nn.Layer):
    """Stands for a ``QuantedLayer`` in the export copy.

    In dynamic mode it runs the quanted layer (the simulation, the reference of the self-check);
    while ``paddle.jit.save`` traces it, it appends the deployment ops. Every decision is frozen
    into Python values and buffers at construction: buffers are static Variables during the trace,
    and the quanted layer's float weight must not be touched there (it would be saved).
    """

    def __init__(self, quanted: QuantedLayer) -> None:
        super().__init__()
        self._quanted = (quanted,)  # a tuple: not a sublayer
        self.bias = quanted.bias
        # a residual block quantizes the input first, through ``quantize_input``
        self.input_quantized_outside = quanted.input_quantized_outside
        pre = quanted.act_preprocess
        self.act_preprocess = pre if (pre is not None and not quanted.act_pact) else None
        conv = quanted.layer
        self._conv_args = None
        if quanted.layer_type == "Conv2D":
            self._conv_args = dict(
                stride=conv._stride, padding=conv._padding, dilation=conv._dilation,
                groups=conv._groups, data_format=conv._data_format,
            )
            self._padding_mode = conv._padding_mode
            self._pad = getattr(conv, "_reversed_padding_repeated_twice", None)

    @property
    def quanted(self) -> QuantedLayer:
        """The quanted layer this one stands for."""
        return self._quanted[0]

    def quantize_input(self, x):
        """The input as this layer quantizes it: the simulation in dynamic mode, its deployment ops when traced."""
        if paddle.in_dynamic_mode():
            return self._quanted[0].quantize_input(x)
        return self._traced_quantize(x)

    def _traced_input(self, x):
        """The traced input quantized, unless a residual block already quantized it (``quantize_input``)."""
        return x if self.input_quantized_outside else self._traced_quantize(x)

    def _traced_quantize(self, x):
        raise NotImplementedError

    def _conv_input(self, x):
        """``(x, conv2d keyword arguments)``; non-zero padding modes pad explicitly, as the quanted layer."""
        args = dict(self._conv_args)
        if self._padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self._padding_mode, data_format=args["data_format"])
            args["padding"] = 0
        return x, args


class _Int8Layer(_ExportLayer):
    """int8 deployment: quantize/dequantize pair on the input, int8 weight + dequantize."""

    def __init__(self, quanted: QuantedLayer, plan: LayerExport, weight_int8: np.ndarray, clip: bool) -> None:
        super().__init__(quanted)
        self._unsigned = not plan.act_signed
        self._clip = float(plan.act_scale) if clip else None
        channels = weight_int8.shape[0]
        self._weight_shape = tuple(int(d) for d in weight_int8.shape)
        self.register_buffer("act_scale", paddle.to_tensor([plan.deploy_act_scale], dtype="float32"))
        self.register_buffer("act_zero_point", paddle.zeros([1], dtype="int32"))
        self.register_buffer("weight_int8", paddle.to_tensor(weight_int8, dtype="int8"))
        self.register_buffer(
            "weight_scale", paddle.to_tensor(np.asarray(plan.deploy_weight_scale, "float32"))
        )
        self.register_buffer("weight_zero_point", paddle.zeros([channels], dtype="int32"))
        self.float_output = False  # set by the exporter for convolutions feeding a residual add
        # set by the exporter when the input comes from a conv [+ batch norm] + relu/relu6 that
        # Paddle fuses and itself counts as unsigned (``program.fused_unsigned_inputs``)
        self.unsigned_by_fusion = False
        self.export_name = plan.name

    def _traced_quantize(self, x):
        if self.act_preprocess is not None:
            x = self.act_preprocess(x)
        if self._clip is not None:
            x = paddle.clip(x, min=-self._clip, max=self._clip)
        if self._unsigned and not self._unsigned_for_paddle(x):
            x = F.relu(x)  # a no-op on these values; it makes Paddle quantize to u8
        x = append_quant_op("quantize_linear", x, self.act_scale, self.act_zero_point, -1, self._unsigned)
        return append_quant_op(
            "dequantize_linear", x, self.act_scale, self.act_zero_point, -1, self._unsigned
        )

    def _unsigned_for_paddle(self, x) -> bool:
        """Whether Paddle's passes will call ``x`` unsigned without a no-op ``relu`` in front.

        True when ``x`` is a ``relu`` output, or a relu6/relu output the exporter found fused into
        the convolution before it. Then the fused convolution writes the u8 codes itself (int8 to
        int8); a ``relu`` in between would make it write fp32 for a separate relu and quantize.
        An explicit clip comes after the activation, so it always needs the relu.
        """
        if self._clip is not None:
            return False
        producer = getattr(x, "op", None)
        if producer is None:
            return False
        if producer.type == "relu":
            return True
        return self.unsigned_by_fusion and producer.type in FUSED_UNSIGNED_ACTIVATIONS

    def _weight(self):
        return append_quant_op(
            "dequantize_linear", self.weight_int8, self.weight_scale, self.weight_zero_point, 0, False
        )


class Int8Conv2D(_Int8Layer):
    @paddle.jit.not_to_static
    def forward(self, x):
        if paddle.in_dynamic_mode():
            return self._quanted[0](x)
        x, args = self._conv_input(x)
        y = F.conv2d(self._traced_input(x), self._weight(), bias=self.bias, **args)
        # a no-op Paddle does not fuse through: the conv stays int8 with an fp32 output, and the
        # batch norm / residual add / relu after it run in float, as in the simulation
        return paddle.scale(y, 1.0) if self.float_output else y


class Int8Linear(_Int8Layer):
    """A ``Linear`` traced as reshape -> 1x1 conv2d (per-channel int8 weight) -> reshape."""

    @paddle.jit.not_to_static
    def forward(self, x):
        if paddle.in_dynamic_mode():
            return self._quanted[0](x)
        out_features, in_features = self._weight_shape[:2]
        lead = list(x.shape[:-1])
        x4 = paddle.reshape(x, [-1, in_features, 1, 1])
        y = F.conv2d(self._traced_input(x4), self._weight(), bias=self.bias)
        if sum(1 for d in lead if d is None or d < 0) <= 1:
            return paddle.reshape(y, [-1 if (d is None or d < 0) else d for d in lead] + [out_features])
        shape = paddle.concat([paddle.shape(x)[:-1], paddle.to_tensor([out_features], dtype="int32")])
        return paddle.reshape(y, shape)


class _FakeQuantLayer(_ExportLayer):
    """The fallback for a layer whose int8 deployment disagrees: float kernels on the simulated values.

    The input is fake-quantized with float ops (clip, scale, round, scale) and the weight is the
    simulated (fake-quantized) weight, so the deployed layer computes what the simulation computes,
    at float speed. No quantize/dequantize ops, so Paddle leaves it in float.
    """

    def __init__(self, quanted: QuantedLayer, plan: LayerExport) -> None:
        super().__init__(quanted)
        self._threshold = float(plan.act_scale)
        self._qmax = float(qmax_for_bits(plan.act_bits))
        self.register_buffer("weight_fq", quanted.quantized_weight().astype("float32"))

    def _traced_quantize(self, x):
        if self.act_preprocess is not None:
            x = self.act_preprocess(x)
        t, qmax = self._threshold, self._qmax
        x = paddle.clip(x, min=-t, max=t)
        return append_round(x * (qmax / t)) * (t / qmax)


class FakeQuantConv2D(_FakeQuantLayer):
    @paddle.jit.not_to_static
    def forward(self, x):
        if paddle.in_dynamic_mode():
            return self._quanted[0](x)
        x, args = self._conv_input(x)
        return F.conv2d(self._traced_input(x), self.weight_fq, bias=self.bias, **args)


class FakeQuantLinear(_FakeQuantLayer):
    @paddle.jit.not_to_static
    def forward(self, x):
        if paddle.in_dynamic_mode():
            return self._quanted[0](x)
        return F.linear(self._traced_input(x), self.weight_fq, bias=self.bias)


INT8_TYPES = {"Conv2D": Int8Conv2D, "Linear": Int8Linear}
FAKE_QUANT_TYPES = {"Conv2D": FakeQuantConv2D, "Linear": FakeQuantLinear}


class FrozenActQuanter(Quanter):
    """Fake quant with a fixed threshold (replaces an activation ``FakeQuanter`` in the copy).

    Same values as the ``FakeQuanter`` in eval mode, but it neither observes (a PTQ calibrator in
    ``'always'`` mode would keep calibrating on the check samples) nor recomputes its threshold
    every call (a KL threshold is costly).
    """

    def __init__(self, threshold: float, quant_bits: int) -> None:
        super().__init__(quant_bits=quant_bits, axis=None)
        self.register_buffer("threshold", paddle.to_tensor([threshold], dtype="float32"))

    def forward(self, x):
        return fake_quant(x, self.threshold, self.quant_bits)

    def scale(self):
        return self.threshold.detach()
