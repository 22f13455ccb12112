"""Export a quantized model (QAT or PTQ) to a Paddle Inference model that runs int8 on CPU.

``export_quantized_model(model, path, input_spec, sample_inputs)`` writes

* ``path.pdmodel`` + ``path.pdiparams`` (+ ``path.pdiparams.info``): a legacy Paddle inference
  model that ``qtrainer.quant.inference.create_predictor(path)`` (oneDNN + ``enable_mkldnn_int8``)
  runs with int8 kernels;
* ``path.quant.json``: per layer the bits, scales and how it was exported (``int8``,
  ``fake-quant`` or ``float``, and why), the self-check numbers and the int8 op counts;

and returns an ``ExportReport`` with the same content. ``path`` is a prefix, as in
``paddle.jit.save``. The user's model is not touched: the export works on a deep copy in eval mode.

The format (what Paddle's oneDNN int8 passes need, measured on Paddle 3.3.1):

* Each quantized layer's input goes through ``quantize_linear`` -> ``dequantize_linear`` whose
  output feeds the convolution directly (otherwise Paddle leaves the op in float). ``Scale`` holds
  an abs-max threshold ``S``: oneDNN computes ``round(x / S * 127)`` (s8) or ``round(x / S * 255)``
  (u8). Paddle picks u8 only when the quantized variable is produced by a ``relu`` (or a conv / fc
  fused with relu).
* Weights are stored as an ``int8`` tensor followed by ``dequantize_linear`` along the
  output-channel axis with ``S = T``: the codes ``round(w_q / T * 127)``. Paddle re-quantizes the
  dequantized float weight per output channel after folding batch norms, mapping the channel's
  largest value to 127: exact when that value is ``T`` (abs-max weights). Weights with fewer than
  8 bits are simulated on these int8 levels already (``quanters.snap_to_int8_grid``): a 4-bit
  weight is an int8 tensor holding 15 values, ``round(k * 127 / 7)`` for k in -7..7. (Written
  as the codes k with ``S = T * 127 / 7``, Paddle's re-quantization moved a 4-bit MobileNetV1's
  deployment 11% of top-1 answers away from its uniform-grid simulation.) A user weight quanter
  whose output is off the int8 grid is rounded onto it; the report's ``weight_grid_error`` says
  by how much (in int8 steps).
* ``Linear`` layers are exported as ``reshape -> 1x1 conv2d -> reshape``. Measured (3-layer MLP,
  1 thread): as ``fc`` ops, Paddle's pass computes per-channel fc weight scales from consecutive
  memory blocks instead of columns, and it quantized only 1 of 3 fc ops (rel. L2 vs the simulation
  0.087); as 1x1 convolutions all 3 ran int8 and matched the per-channel simulation (rel. L2
  0.0004). A signed input also fares better in a convolution (7-bit weights on CPUs without VNNI)
  than in an fc (int16 saturation, rel. L2 0.11). Cost: on this AVX2 CPU an int8 Linear is no
  faster than oneDNN's float one (batch 8: 4.5 ms vs 4.0 ms for 512-1024-1024-10), so
  ``keep_float=['*fc*']``-style patterns are there for Linear-heavy models.

Residual adds: an int8 convolution whose output goes only to an ``elementwise_add`` (directly or
through a batch norm) ends with a no-op ``scale(1.0)`` that Paddle does not fuse through, so the
convolution runs int8 with an fp32 output and the batch norm, add and relu run in float, as in the
simulation. Without it Paddle fuses conv + add: where the residual input or the output has no int8
scale it runs the fused convolution in float on an unquantized input, and elsewhere it quantizes
the identity path to the grid of the block input's quantize op, which the simulation adds in
float. Measured on a Fashion-MNIST ResNet18 QAT model (256 samples, no fallback): 16 of 21 layers
int8, rel. L2 0.031, 98.05% top-1 agreement; with the no-op (and the stem, whose input is signed,
as fake-quant) all 20 others int8, rel. L2 0.0064. The exporter finds these convolutions in the
first traced program (``residual_conv_weights``) and traces again; the report marks them
``float_output``.

Activations, per layer (``act_signed`` in the JSON comes from the sample inputs: a layer whose
inputs were all >= 0 is unsigned):

* unsigned, 8 bits: u8 with ``S = T * 255 / 127``: the u8 codes of ``[0, T]`` are exactly the
  simulation's codes 0..127, and staying at or below 128 keeps CPUs without VNNI from saturating
  their 16-bit sums of u8*s8 pairs (``vpmaddubsw``; with ``S = T`` a MobileNetV1 agreed on 82.6%
  of top-1 only). A no-op ``relu`` is inserted before the pair unless the input already comes
  from a ``relu``, so that Paddle uses u8. Values between ``T`` and ``2T``, which the simulation
  clips to ``T``, keep codes up to 255: an explicit clip (``clip_activations=True``) makes the
  deployment equal the simulation (small CNN: rel. L2 1e-7 instead of 0.006, 100% agreement
  either way) but breaks Paddle's int8-to-int8 chaining (MobileNetV1, batch 8, 2 threads:
  1.04x instead of 1.95x over FP32), so it is off by default for 8 bits.
* signed, 8 bits: s8 with ``S = T``. On CPUs without VNNI oneDNN then halves the convolution
  weights (7-bit), so layers with a signed input (typically the first convolution on a normalised
  image) are the first suspects when the self-check fails.
* fewer than 8 bits (e.g. 4): the same int8 kernels on the simulation's coarser grid
  (``S = T * 127 / qmax``, or ``T * 255 / qmax`` unsigned), with an explicit ``clip`` to
  ``[-T, T]`` in front, so the deployed values equal the simulated ones.
* more than 8 bits (weights or activations): Paddle has no int16 CPU kernels; the layer is kept
  in float (its float ``layer``) and the report says so. So are the layers named by
  ``keep_float``. If no layer is left for int8, the export refuses (``ValueError``).
* PACT: the threshold is ``alpha`` (``act_scale()``), written as the scale; no extra op.

The self-check (``check=True``): the export is loaded with an oneDNN int8 predictor and run on the
sample inputs (``sample_inputs``: arrays or a loader; otherwise random data shaped by
``input_spec``; a loader is sampled evenly across its whole length). Its outputs are compared
with the dygraph model's (relative L2, per sample too; top-1 agreement over the samples whose
top-1 is clear, ``selfcheck.compare_samples``; near ties are judged by relative L2 only, which
an untrained network's outputs are) and the int8 compute ops of the optimized program are counted (one per layer exported
int8). If the numbers miss ``min_agreement`` / ``max_rel_l2`` and ``fallback`` is on, the layers
responsible are searched (``selfcheck.find_culprits``: first guess, the int8 layers with a signed
input; then a bisection over the layers in forward order) within ``search_time_limit`` seconds.
They are exported as ``'fake-quant'`` layers: float kernels on the fake-quantized input (clip,
scale, floor, scale ops) with the fake-quantized weight, i.e. exactly the simulation at float
speed -- rather than as the plain float layer, whose missing quantization noise alone moved 4 of
512 top-1 answers of a small CNN. Unsigned culprits are then tried back in int8 with an explicit
clip to ``[0, T]`` (a KL or PACT threshold that clips on purpose is what they usually miss) and
kept so when that passes. The report, the log and the JSON name these layers and say why. The
int8 op count is part of the report; fewer int8 ops than int8 layers (Paddle left some in float)
fails the check only with ``strict_int8=True``. If the check still fails, ``on_failure='raise'``
(default) raises ``ExportCheckError`` and writes
nothing; ``on_failure='write'`` writes the model and a report that says it failed.

The reference is always the quantized dygraph model (a deep copy in eval mode; activation
quanters frozen at their scale, so PTQ calibrators stop observing and the check samples do not
change any scale).

Files are written to a temporary directory next to the target and moved into place at the end,
the JSON last with the SHA-256 of each model file (``qtrainer.quant.publish``; our loaders refuse
files that do not match it, so an interrupted replacement never passes for a checked model;
staging directories of killed exports are removed by the next export to the same target). An
existing export is replaced only with ``overwrite=True``, or when its JSON records the same
``run_id`` (the same run, resumed). No global state changes: the model
is traced inside ``paddle.pir_utils.DygraphOldIrGuard`` and the process stays in dynamic mode.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import paddle
from paddle import nn
import paddle.nn.functional as F

from qtrainer.quant.base import Quanter, qmax_for_bits
from qtrainer.quant.inference import load_int8_predictor, read_program_ops, run_predictor
from qtrainer.quant.observers import MIN_SCALE
from qtrainer.quant.pact import PACTQuanter
from qtrainer.quant.publish import make_staging_dir, publish, report_run_id
from qtrainer.quant.quanters import INT8_QMAX, FakeQuanter, fake_quant
from qtrainer.quant.selfcheck import (
    CheckResult,
    compare_samples,
    find_culprits,
    judge,
    sample_batches,
    spec_shapes,
)
from qtrainer.quant.wrap import QuantedLayer, iter_quanted_layers

__all__ = ["export_quantized_model", "check_export_target", "ExportReport", "ExportCheckError", "LayerExport"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "qtrainer-int8"
FORMAT_VERSION = 1
_MODEL_FILES = (".pdmodel", ".pdiparams", ".pdiparams.info")
_JSON_SUFFIX = ".quant.json"
_ON_FAILURE = ("raise", "write")
_CLIP_CHOICES = ("auto", True, False)
_INT8_BITS = 8
# The u8 scale of an unsigned 8-bit activation: codes of [0, T] are 0..127, as in the simulation.
_U8_FACTOR = 255.0 / 127.0
# A threshold this small means the layer only ever saw zeros; Paddle would leave it in float.
_TINY_SCALE = 1e3 * MIN_SCALE


class ExportCheckError(RuntimeError):
    """The exported model failed its self-check; ``report`` has the numbers. Nothing was written."""

    def __init__(self, message: str, report: "ExportReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LayerExport:
    """How one quantized layer is exported (one entry of the JSON's ``layers``)."""

    name: str
    type: str
    export: str  # 'int8', 'fake-quant' (self-check fallback) or 'float'
    reason: str | None
    act_bits: int
    weight_bits: int
    weight_axis: int | None
    act_pact: bool
    calls: int = 0
    input_min: float | None = None
    act_signed: bool | None = None
    act_scale: float | None = None  # the model's threshold T
    deploy_act_scale: float | None = None  # the Scale written for quantize_linear
    above_threshold: float | None = None  # fraction of sample input values beyond T
    act_clip: bool = False
    shares_input_with: list[str] = field(default_factory=list)
    weight_scale: list[float] | None = None
    deploy_weight_scale: list[float] | None = None
    weight_grid_error: float | None = None
    float_output: bool = False  # int8 conv whose output feeds a residual add: fp32 output, see the docstring

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportReport:
    """What ``export_quantized_model`` wrote and how its self-check went."""

    path: str
    files: dict[str, str]
    layers: list[LayerExport]
    input_spec: list[dict[str, Any]]
    check: CheckResult | None = None
    sample_source: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    written: bool = False
    run_id: str | None = None  # the run that wrote it (the callbacks replace their own export on resume)
    sha256: dict[str, str] = field(default_factory=dict)  # {file name: hex}, what the loaders verify

    @property
    def int8_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.export == "int8"]

    @property
    def kept_float(self) -> dict[str, str]:
        """``{name: reason}`` of the layers not running int8 (``'float'`` and ``'fake-quant'``)."""
        return {layer.name: layer.reason or "" for layer in self.layers if layer.export != "int8"}

    @property
    def passed(self) -> bool | None:
        """True/False after a self-check, None when the check was off."""
        return None if self.check is None else self.check.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "paddle": paddle.__version__,
            "run_id": self.run_id,
            "files": self.files,
            "input_spec": self.input_spec,
            "int8_layers": self.int8_layers,
            "kept_float": self.kept_float,
            "layers": [layer.to_dict() for layer in self.layers],
            "check": None if self.check is None else {
                **self.check.to_dict(),
                "sample_source": self.sample_source,
            },
            "attempts": self.attempts,
        }

    def summary(self) -> str:
        lines = [
            f"int8 export {self.path}: {len(self.int8_layers)} layer(s) int8, "
            f"{len(self.kept_float)} not int8"
        ]
        for layer in self.layers:
            if layer.export != "int8":
                lines.append(f"  {layer.export}: {layer.name} ({layer.reason})")
        if self.check is not None:
            lines.append(f"  self-check vs dygraph ({self.sample_source} samples): {self.check.summary()}")
        return "\n".join(lines)


# ====================================================================== emitted ops
def _append_quant_op(op_type: str, x, scale, zero_point, quant_axis: int, unsigned: bool):
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
            "bit_length": _INT8_BITS,
            # oneDNN ignores qmin/qmax; Paddle's own CPU kernels use them
            "qmin": 0 if unsigned else -128,
            "qmax": 255 if unsigned else 127,
            "round_type": 0,
            "is_test": True,
            "only_observer": False,
        },
    )
    return out


def _append_round(x):
    """``floor(x + 0.5)`` as legacy ops (``paddle.round``/``floor`` build PIR ops only).

    Not Paddle's ``round`` op: its CPU kernel took 0.5 s on an 8x32x112x112 tensor where ``floor``
    takes a few ms. Differs from the simulation's rounding only at exact ties.
    """
    from paddle.base.layer_helper import LayerHelper

    helper = LayerHelper("floor")
    out = helper.create_variable_for_type_inference(dtype=x.dtype)
    helper.append_op(type="floor", inputs={"X": [x + 0.5]}, outputs={"Out": [out]})
    return out


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
        self.export_name = plan.name

    def _quantize_input(self, x):
        if self.act_preprocess is not None:
            x = self.act_preprocess(x)
        if self._clip is not None:
            x = paddle.clip(x, min=-self._clip, max=self._clip)
        producer = getattr(x, "op", None)
        if self._unsigned and (self._clip is not None or producer is None or producer.type != "relu"):
            x = F.relu(x)  # a no-op on these values; it makes Paddle quantize to u8
        x = _append_quant_op("quantize_linear", x, self.act_scale, self.act_zero_point, -1, self._unsigned)
        return _append_quant_op(
            "dequantize_linear", x, self.act_scale, self.act_zero_point, -1, self._unsigned
        )

    def _weight(self):
        return _append_quant_op(
            "dequantize_linear", self.weight_int8, self.weight_scale, self.weight_zero_point, 0, False
        )


class _Int8Conv2D(_Int8Layer):
    @paddle.jit.not_to_static
    def forward(self, x):
        if paddle.in_dynamic_mode():
            return self._quanted[0](x)
        x, args = self._conv_input(x)
        y = F.conv2d(self._quantize_input(x), self._weight(), bias=self.bias, **args)
        # a no-op Paddle does not fuse through: the conv stays int8 with an fp32 output, and the
        # batch norm / residual add / relu after it run in float, as in the simulation
        return paddle.scale(y, 1.0) if self.float_output else y


class _Int8Linear(_Int8Layer):
    """A ``Linear`` traced as reshape -> 1x1 conv2d (per-channel int8 weight) -> reshape."""

    @paddle.jit.not_to_static
    def forward(self, x):
        if paddle.in_dynamic_mode():
            return self._quanted[0](x)
        out_features, in_features = self._weight_shape[:2]
        lead = list(x.shape[:-1])
        x4 = paddle.reshape(x, [-1, in_features, 1, 1])
        y = F.conv2d(self._quantize_input(x4), self._weight(), bias=self.bias)
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

    def _fake_quant_input(self, x):
        if self.act_preprocess is not None:
            x = self.act_preprocess(x)
        t, qmax = self._threshold, self._qmax
        x = paddle.clip(x, min=-t, max=t)
        return _append_round(x * (qmax / t)) * (t / qmax)


class _FakeQuantConv2D(_FakeQuantLayer):
    @paddle.jit.not_to_static
    def forward(self, x):
        if paddle.in_dynamic_mode():
            return self._quanted[0](x)
        x, args = self._conv_input(x)
        return F.conv2d(self._fake_quant_input(x), self.weight_fq, bias=self.bias, **args)


class _FakeQuantLinear(_FakeQuantLayer):
    @paddle.jit.not_to_static
    def forward(self, x):
        if paddle.in_dynamic_mode():
            return self._quanted[0](x)
        return F.linear(self._fake_quant_input(x), self.weight_fq, bias=self.bias)


_INT8_TYPES = {"Conv2D": _Int8Conv2D, "Linear": _Int8Linear}
_FAKE_QUANT_TYPES = {"Conv2D": _FakeQuantConv2D, "Linear": _FakeQuantLinear}


class _FrozenActQuanter(Quanter):
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


# ====================================================================== the export
def export_quantized_model(
    model: nn.Layer,
    path: str,
    input_spec: Sequence[Any] | None = None,
    sample_inputs: Any = None,
    check: bool = True,
    min_agreement: float = 0.995,
    max_rel_l2: float = 0.05,
    fallback: bool = True,
    search_time_limit: float = 300.0,
    on_failure: str = "raise",
    overwrite: bool = False,
    run_id: str | None = None,
    keep_float: Sequence[str] = (),
    fake_quant_layers: Sequence[str] = (),
    clip_activations: bool | str = "auto",
    strict_int8: bool = False,
    num_threads: int = 1,
) -> ExportReport:
    """Export a quantized ``model`` for Paddle Inference int8 on CPU and check it; see the module docstring.

    Args:
        model: a model with quantized layers (``QAT.quantize`` / PTQ); it is not modified.
        path: file prefix (``path.pdmodel``, ``path.pdiparams``, ``path.quant.json``).
        input_spec: ``paddle.static.InputSpec`` list (default: from the first sample batch with a
            free batch dimension).
        sample_inputs: batches for the self-check and for deciding which layer inputs are
            unsigned: a numpy array / Tensor, a list of them, or a loader (first element of each
            batch, up to 8 batches). Default: random normal data shaped by ``input_spec`` (all
            first-layer inputs then look signed; real batches are much better).
        check: run the self-check.
        min_agreement, max_rel_l2: the self-check's thresholds (top-1 agreement of the first
            output and relative L2 error of all outputs, deployed vs dygraph).
        fallback: when the check fails, find the responsible layers and keep them in float.
        search_time_limit: seconds the fallback search may take.
        on_failure: ``'raise'`` (raise ``ExportCheckError``, write nothing) or ``'write'`` (write
            the model and a report saying the check failed).
        overwrite: replace an existing export at ``path``.
        run_id: an identifier of the run writing the export, recorded in the JSON; an existing
            export recorded with the same ``run_id`` (this run's own, e.g. before a resume) is
            replaced without ``overwrite`` (see ``check_export_target``).
        keep_float: names or ``fnmatch`` patterns of quantized layers to export as their float
            layer (not quantized at all).
        fake_quant_layers: names or patterns of layers to export as ``'fake-quant'`` from the
            start (float kernels computing the simulated values), e.g. a first convolution on a
            signed input on a CPU without VNNI.
        clip_activations: add an explicit clip to ``[-T, T]`` before the quantization:
            ``'auto'`` (layers with fewer than 8 activation bits), ``True`` (every int8 layer;
            exact clipping, one more op each) or ``False``.
        strict_int8: fail the check when Paddle runs fewer int8 ops than layers exported as int8
            (default: a note in the report and a warning).
        num_threads: CPU threads of the checking predictor.

    Returns:
        an ``ExportReport`` (also written as ``path.quant.json``).
    """
    started = time.monotonic()
    _check_options(model, min_agreement, max_rel_l2, on_failure, clip_activations, search_time_limit)
    _check_patterns(keep_float, "keep_float")
    _check_patterns(fake_quant_layers, "fake_quant_layers")
    if isinstance(model, QuantedLayer):
        raise ValueError(
            "export_quantized_model needs the model that contains the quantized layers, not a bare "
            f"{type(model).__name__}; wrap it, e.g. paddle.nn.Sequential(layer)"
        )
    names = [name for name, _ in iter_quanted_layers(model)]
    if not names:
        raise ValueError(
            f"export_quantized_model: {type(model).__name__} has no quantized layer; quantize it "
            "first (QAT(...).quantize(model), or PTQ) -- a float model exports with paddle.jit.save"
        )
    prefix = _target_prefix(path, overwrite, run_id)
    staging, created_dirs = _make_staging_dir(prefix)
    published = False
    try:
        work = _working_copy(model)
        quanted = dict(iter_quanted_layers(work))
        if input_spec is not None:
            input_spec = _normalise_spec(input_spec, None)
        # the samples also decide which layer inputs are unsigned, so they are needed without check
        batches, source = sample_batches(sample_inputs, input_spec)
        spec = _normalise_spec(input_spec, batches)
        _check_batches_match(batches, spec)
        _dry_run(work, spec)
        observed, reference = _observe(work, quanted, batches)
        plans, weights = _plan_layers(quanted, observed, keep_float, clip_activations)
        exporter = _Exporter(work, quanted, plans, weights, spec, staging, batches, reference,
                             observed, min_agreement, max_rel_l2, strict_int8, num_threads)
        exporter.caveats = _check_caveats(source, plans)
        candidates = [n for n in exporter.order if plans[n].export == "int8"]
        if not candidates:
            raise ValueError(
                "export_quantized_model: no layer can be exported as int8: "
                + "; ".join(f"{n}: {p.reason}" for n, p in plans.items())
            )
        forced = frozenset(n for n in candidates if _matches(n, fake_quant_layers))
        floated, clipped = forced, frozenset()
        if check:
            first = exporter.attempt(floated)
            if not first.result.numerics_ok and fallback:
                deadline = time.monotonic() + search_time_limit
                floated, passed = find_culprits(
                    [n for n in candidates if n not in forced],
                    exporter.fails,
                    base=forced,
                    first_guess=[n for n in candidates if plans[n].act_signed],
                    deadline=deadline,
                )
                if passed:
                    floated, clipped = _int8_with_clip(exporter, plans, floated, forced, deadline)
        final = exporter.attempt(floated, clipped, run_check=check)
        _mark_fallback(plans, final.floated, final.clipped, forced)
        report = ExportReport(
            path=prefix,
            files={},
            layers=[plans[n] for n in exporter.order_all()],
            input_spec=[_spec_dict(s) for s in spec],
            check=final.result,
            sample_source=source if check else None,
            attempts=[a.to_dict() for a in exporter.attempts],
            run_id=run_id,
        )
        if report.check is not None and report.check.notes:
            logger.warning("export %s: %s", prefix, "; ".join(report.check.notes))
        if report.check is not None and report.check.caveats:
            logger.warning(
                "export %s: the self-check is weak here: %s -- check the deployed model on real "
                "data (qtrainer.quant.inference)", prefix, "; ".join(report.check.caveats)
            )
        if report.check is not None and not report.check.passed:
            message = (
                f"export self-check failed for {prefix}: {report.check.summary()}; kept float: "
                f"{sorted(report.kept_float) or 'none'}"
            )
            if on_failure == "raise":
                raise ExportCheckError(
                    message + " (nothing written; on_failure='write' writes it anyway)", report
                )
            logger.error("%s (written anyway: on_failure='write')", message)
        report.files = _publish(final.directory, staging, prefix, report)
        report.written = published = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not published:
            _remove_empty(created_dirs)
    logger.info("%s (%.1f s)", report.summary(), time.monotonic() - started)
    return report


# ---------------------------------------------------------------------- validation
def _check_patterns(patterns: Any, argument: str) -> None:
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)) or not all(
        isinstance(p, str) for p in patterns
    ):
        raise TypeError(f"{argument}={patterns!r} must be a list of layer names or fnmatch patterns")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_options(model, min_agreement, max_rel_l2, on_failure, clip_activations,
                   search_time_limit) -> None:
    if not isinstance(model, nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if not (isinstance(min_agreement, (int, float)) and 0.0 <= min_agreement <= 1.0):
        raise ValueError(f"min_agreement={min_agreement!r} must be a number in [0, 1]")
    if not (isinstance(max_rel_l2, (int, float)) and max_rel_l2 >= 0.0):
        raise ValueError(f"max_rel_l2={max_rel_l2!r} must be a number >= 0")
    if on_failure not in _ON_FAILURE:
        raise ValueError(f"on_failure={on_failure!r} is not valid: use one of {_ON_FAILURE}")
    if not (isinstance(clip_activations, bool) or clip_activations == "auto"):
        raise ValueError(f"clip_activations={clip_activations!r} is not valid: use one of {_CLIP_CHOICES}")
    if not (isinstance(search_time_limit, (int, float)) and search_time_limit >= 0):
        raise ValueError(f"search_time_limit={search_time_limit!r} must be a number of seconds >= 0")


def check_export_target(path: Any, overwrite: bool = False, run_id: str | None = None) -> str:
    """Check that an export may be written at the prefix ``path``; return it as an absolute path.

    Absent: fine. Present and recorded with ``run_id`` (written earlier by this same run, e.g.
    before it was killed and resumed): it will be replaced. Present otherwise: ``FileExistsError``
    naming the files, unless ``overwrite``. Also refuses a directory, a path with an extension and
    an existing file (``ValueError``). Cheap: the callbacks call it before training.
    """
    return _target_prefix(path, overwrite, run_id)


def _target_prefix(path: Any, overwrite: bool, run_id: str | None = None) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str (a file prefix), got {type(path).__name__}")
    path = os.fspath(path)
    if not path or path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise ValueError(
            f"path={path!r} is a directory; the export path is a file prefix, e.g. "
            f"{os.path.join(path or '.', 'model')!r} writes model.pdmodel, model.pdiparams and "
            "model.quant.json there"
        )
    for suffix in _MODEL_FILES + (_JSON_SUFFIX, ".json"):
        if path.endswith(suffix):
            raise ValueError(
                f"path={path!r} ends with {suffix!r}; give the prefix without extension, e.g. "
                f"{path[: -len(suffix)]!r}"
            )
    if os.path.isfile(path):
        raise ValueError(
            f"path={path!r} is an existing file; the export path is a prefix for new files "
            "(path.pdmodel, path.pdiparams, path.quant.json)"
        )
    existing = [path + s for s in _MODEL_FILES + (_JSON_SUFFIX,) if os.path.exists(path + s)]
    if existing and not overwrite:
        owner = report_run_id(path)
        if run_id is not None and owner == run_id:
            logger.info("export: %s was written by this run (run_id %s) before; it will be replaced", path, run_id)
            return os.path.abspath(path)
        whose = (f"written by another run (run_id {owner})" if owner is not None
                 else "not written by a qtrainer run with a run id")
        raise FileExistsError(
            f"an export already exists at {path!r} ({', '.join(existing)}; {whose}); pass overwrite=True "
            "to replace it or choose another path"
        )
    return os.path.abspath(path)


def _make_staging_dir(prefix: str) -> tuple[str, list[str]]:
    """A temporary directory next to the target, and the directories created for it (deepest first)."""
    parent = os.path.dirname(prefix)
    created = []
    directory = parent
    while directory and not os.path.exists(directory):
        created.append(directory)
        directory = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        return make_staging_dir(parent, os.path.basename(prefix)), created
    except OSError as err:
        _remove_empty(created)
        raise PermissionError(
            f"cannot write the export to {prefix!r}: {err.strerror or err} ({parent!r} must be a "
            "writable directory)"
        ) from err


def _remove_empty(directories: list[str]) -> None:
    for directory in directories:  # deepest first; rmdir refuses non-empty directories
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _working_copy(model: nn.Layer) -> nn.Layer:
    """A deep copy in eval mode whose activation quanters no longer observe (fixed thresholds)."""
    work = copy.deepcopy(model)
    work.eval()
    unobserved = []
    for name, layer in iter_quanted_layers(work):
        quanter = layer.act_quanter
        if isinstance(quanter, FakeQuanter):
            if not quanter.observer.has_observed():
                unobserved.append(name)
                continue
            layer.act_quanter = _FrozenActQuanter(float(layer.act_scale().item()), layer.act_bits)
        elif isinstance(quanter, PACTQuanter):
            pact = quanter.pact
            if pact.observer is not None and not pact.observer.has_observed() and pact.in_warmup():
                unobserved.append(name)
        weight = layer.weight_quanter
        if isinstance(weight, FakeQuanter):  # a calibrating PTQ model neither observes nor quantizes
            frozen_unobserved = weight.observe_mode == "never" and not weight.observer.has_observed()
            weight.set_mode(observe="always" if frozen_unobserved else None, quantize=True)
    if unobserved:
        raise ValueError(
            f"the activation quantizers of {', '.join(unobserved)} have seen no data, so they have no "
            "scale: train (QAT) or calibrate (PTQ) the model before exporting it"
        )
    return work


def _normalise_spec(input_spec: Sequence[Any] | None, batches) -> list[paddle.static.InputSpec]:
    if input_spec is None:
        if not batches:
            raise ValueError("export_quantized_model needs input_spec or sample_inputs")
        return [
            paddle.static.InputSpec([None, *a.shape[1:]], dtype=str(a.dtype), name=f"x{i}" if i else "x")
            for i, a in enumerate(batches[0])
        ]
    if isinstance(input_spec, paddle.static.InputSpec) or not isinstance(input_spec, (list, tuple)):
        raise TypeError(
            f"input_spec must be a list of paddle.static.InputSpec (one per model input), got "
            f"{type(input_spec).__name__}"
        )
    specs = []
    for index, item in enumerate(input_spec):
        if isinstance(item, paddle.static.InputSpec):
            specs.append(item)
        elif isinstance(item, paddle.Tensor):
            specs.append(paddle.static.InputSpec.from_tensor(item))
        else:
            raise TypeError(
                f"input_spec[{index}] is a {type(item).__name__}; use paddle.static.InputSpec"
            )
    return specs


def _spec_text(spec: Sequence[Any]) -> str:
    return "[" + ", ".join(f"InputSpec(shape={list(s.shape)}, dtype={s.dtype})" for s in spec) + "]"


def _dry_run(work: nn.Layer, spec: Sequence[Any]) -> None:
    """Run the copy once on zeros shaped by the spec; a failure names the spec."""
    zeros = [paddle.zeros(shape, dtype=dtype) for shape, dtype in spec_shapes(spec, 1)]
    try:
        with paddle.no_grad():
            work(*zeros)
    except Exception as err:
        raise ValueError(
            f"input_spec {_spec_text(spec)} does not match {type(work).__name__}: its forward on "
            f"zeros of that shape failed with {type(err).__name__}: {err}"
        ) from err


def _check_batches_match(batches, spec) -> None:
    for index, batch in enumerate(batches):
        if len(batch) != len(spec):
            raise ValueError(
                f"sample batch {index} has {len(batch)} input(s), input_spec "
                f"{_spec_text(spec)} has {len(spec)}"
            )
        for array, s in zip(batch, spec):
            dims = list(s.shape)
            ok = array.ndim == len(dims) and all(
                d is None or d < 0 or d == n for d, n in zip(dims, array.shape)
            )
            if not ok:
                raise ValueError(
                    f"sample batch {index} has shape {list(array.shape)}, which does not match "
                    f"input_spec {_spec_text(spec)}"
                )


def _spec_dict(spec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": str(spec.dtype).replace("paddle.", "")}


# ---------------------------------------------------------------------- observing the samples
@dataclass
class _Observed:
    order: list[str]  # forward order of first calls
    calls: dict[str, int]
    input_min: dict[str, float]
    above_threshold: dict[str, float]  # fraction of input values with |x| > the threshold T
    shared: dict[str, list[str]]  # layer -> other layers quantizing the same input tensor


def _observe(work: nn.Layer, quanted: dict[str, QuantedLayer], batches) -> tuple[_Observed, list[np.ndarray]]:
    """Reference outputs, and per layer: call order, calls per forward, min of its quantized input."""
    order: list[str] = []
    calls: dict[str, int] = {n: 0 for n in quanted}
    mins: dict[str, float] = {}
    first_inputs: dict[str, paddle.Tensor] = {}  # kept alive, so that identity comparisons hold
    above: dict[str, list[int]] = {}
    thresholds = {name: _threshold_of(layer) for name, layer in quanted.items()}
    state = {"first": True}
    handles = []

    def make_hook(name: str):
        def hook(_layer, inputs):
            x = inputs[0]
            if state["first"]:
                calls[name] += 1
                if name not in order:
                    order.append(name)
                    first_inputs[name] = x
            if x.size:
                low = float(x.min().item())
                mins[name] = min(low, mins.get(name, low))
                counts = above.setdefault(name, [0, 0])
                counts[0] += int((x.abs() > thresholds[name]).astype("int64").sum().item())
                counts[1] += int(x.size)

        return hook

    for name, layer in quanted.items():
        target = layer.act_quanter if (layer.act_preprocess is not None and not layer.act_pact) else layer
        handles.append(target.register_forward_pre_hook(make_hook(name)))
    outputs: list[list[np.ndarray]] = []
    try:
        with paddle.no_grad():
            for batch in batches:
                out = work(*[paddle.to_tensor(a) for a in batch])
                state["first"] = False
                outs = list(out) if isinstance(out, (list, tuple)) else [out]
                if not outputs:
                    outputs = [[] for _ in outs]
                for store, value in zip(outputs, outs):
                    store.append(value.numpy())
    finally:
        for handle in handles:
            handle.remove()
    reference = [np.concatenate(s) if s[0].ndim else np.stack(s) for s in outputs]
    shared = {
        name: [other for other, y in first_inputs.items() if other != name and y is x]
        for name, x in first_inputs.items()
    }
    shared = {name: others for name, others in shared.items() if others}
    fractions = {name: hits / max(total, 1) for name, (hits, total) in above.items()}
    return _Observed(order, calls, mins, fractions, shared), reference


def _threshold_of(layer: QuantedLayer) -> float:
    """The activation threshold T as a float (``TypeError`` naming the layer without ``scale()``)."""
    return float(layer.act_scale().reshape([-1])[0].item())


def _check_caveats(source: str, plans: dict[str, "LayerExport"]) -> list[str]:
    """Why the self-check proves less than usual, known before it runs."""
    caveats = []
    if source == "random":
        caveats.append("random inputs (no sample_inputs), not the data the model was trained or calibrated on")
    zeros = [n for n, p in plans.items() if p.reason and "only saw zeros" in p.reason]
    if zeros:
        caveats.append(
            f"{len(zeros)} layer(s) saw only zeros (scales never observed, e.g. an untrained or "
            f"uncalibrated network) and stay float: {', '.join(zeros[:3])}{', ...' if len(zeros) > 3 else ''}"
        )
    return caveats


def _tie_caveat(comparison) -> list[str]:
    """A caveat when most samples have near-tied top-1 scores (so top-1 agreement says little)."""
    if comparison.zero_reference:
        return ["the model's outputs are all (nearly) zero on these samples (activations vanish, e.g. an "
                "untrained network): there is nothing to compare"]
    if comparison.top1_agreement_all is None or 2 * comparison.judged_samples >= comparison.samples:
        return []
    return [
        f"{comparison.samples - comparison.judged_samples} of {comparison.samples} samples have "
        "near-tied top-1 scores (within the tolerated error); judged by relative L2 error only"
    ]


# ---------------------------------------------------------------------- per-layer plan
def _plan_layers(quanted, observed: _Observed, keep_float, clip_activations):
    plans: dict[str, LayerExport] = {}
    weights: dict[str, np.ndarray] = {}
    for name, layer in quanted.items():
        plan = LayerExport(
            name=name,
            type=layer.layer_type,
            export="int8",
            reason=None,
            act_bits=int(layer.act_bits),
            weight_bits=int(layer.weight_bits),
            weight_axis=layer.weight_axis,
            act_pact=bool(layer.act_pact),
            calls=observed.calls.get(name, 0),
            input_min=observed.input_min.get(name),
            shares_input_with=observed.shared.get(name, []),
        )
        plans[name] = plan
        threshold = _threshold_of(layer)
        plan.act_scale = threshold
        plan.above_threshold = observed.above_threshold.get(name)
        plan.act_signed = plan.input_min is None or plan.input_min < 0
        reason = _float_reason(name, layer, plan, keep_float, threshold)
        if reason is None:
            weights[name], reason = _weight_plan(layer, plan)
        if reason is not None:
            plan.export, plan.reason = "float", reason
            logger.warning("export: %s is kept in float: %s", name, reason)
            continue
        qmax = qmax_for_bits(plan.act_bits)
        low_bits = plan.act_bits < _INT8_BITS
        plan.act_clip = clip_activations is True or (clip_activations == "auto" and low_bits)
        if plan.act_signed:
            plan.deploy_act_scale = threshold * 127.0 / qmax
        else:
            plan.deploy_act_scale = threshold * _U8_FACTOR * 127.0 / qmax
    _unify_shared_scales(plans)
    return plans, weights


def _float_reason(name, layer, plan, keep_float, threshold) -> str | None:
    if _matches(name, keep_float):
        return "keep_float"
    if plan.type not in _INT8_TYPES:
        return f"no int8 export for layer type {plan.type!r}"
    if plan.act_bits > _INT8_BITS or plan.weight_bits > _INT8_BITS:
        return (
            f"{plan.act_bits}-bit activations / {plan.weight_bits}-bit weights: Paddle Inference has "
            "no CPU kernels above 8 bits"
        )
    if not math.isfinite(threshold) or threshold <= _TINY_SCALE:
        return f"activation scale {threshold:g}: the layer only saw zeros"
    channel_axis = {"Conv2D": 0, "Linear": 1}[plan.type]
    if plan.weight_axis not in (None, channel_axis, channel_axis - layer.weight.ndim):
        return (
            f"weight quantized along axis {plan.weight_axis}; the int8 format needs the "
            f"output-channel axis {channel_axis}"
        )
    return None


def _weight_plan(layer: QuantedLayer, plan: LayerExport) -> tuple[np.ndarray | None, str | None]:
    """The int8 weight in the exported layout ([out, in/groups, kh, kw]) and its deploy scales."""
    threshold = layer.weight_scale().numpy().astype("float64").reshape([-1])
    simulated = layer.quantized_weight().numpy().astype("float64")
    axis = plan.weight_axis
    if axis is None:
        t = np.full([1] * simulated.ndim, threshold[0])
    else:
        shape = [1] * simulated.ndim
        shape[axis % simulated.ndim] = -1
        t = threshold.reshape(shape)
    codes = simulated / np.maximum(t, MIN_SCALE) * INT8_QMAX  # Paddle's kernels: the int8 grid of T
    rounded = np.clip(np.round(codes), -INT8_QMAX, INT8_QMAX)
    plan.weight_grid_error = float(np.max(np.abs(codes - rounded))) if codes.size else 0.0
    if plan.weight_grid_error > 0.01:
        logger.warning(
            "export: %s: the simulated weight is off the int8 grid of its scale() by up to %.3g "
            "int8 steps (a %d-bit grid that is not a sub-grid of the int8 one); the int8 weight "
            "rounds it, so the deployment differs from the simulation",
            plan.name,
            plan.weight_grid_error,
            plan.weight_bits,
        )
    out_channels = simulated.shape[0] if plan.type == "Conv2D" else simulated.shape[1]
    per_channel = np.broadcast_to(threshold if axis is not None else threshold[:1], (out_channels,))
    plan.weight_scale = [float(v) for v in threshold]
    plan.deploy_weight_scale = [float(v) for v in per_channel]
    codes_int8 = rounded.astype("int8")
    if plan.type == "Linear":  # [in, out] -> [out, in, 1, 1]
        codes_int8 = np.ascontiguousarray(codes_int8.T).reshape([out_channels, -1, 1, 1])
    return codes_int8, None


def _unify_shared_scales(plans: dict[str, LayerExport]) -> None:
    """Layers quantizing the same tensor: Paddle keeps one scale per tensor, so use the largest."""
    for name, plan in plans.items():
        group = [plans[m] for m in plan.shares_input_with if plans[m].export == "int8"]
        if plan.export != "int8" or not group:
            continue
        members = [plan, *group]
        largest = max(p.deploy_act_scale for p in members)
        if any(abs(p.deploy_act_scale - largest) > 1e-6 * largest for p in members):
            logger.warning(
                "export: %s quantize the same tensor with different scales; Paddle uses one "
                "scale per tensor, exporting the largest (%g) for all",
                ", ".join(p.name for p in members),
                largest,
            )
            for p in members:
                p.deploy_act_scale = largest


def _int8_with_clip(exporter: "_Exporter", plans, floated: frozenset, forced: frozenset,
                    deadline: float) -> tuple[frozenset, frozenset]:
    """Try the unsigned fallback layers back in int8 with an explicit clip to ``[0, T]``.

    Such a layer often disagreed only because the deployment keeps values above ``T`` (a KL or
    PACT threshold that clips on purpose) that the simulation clips; the clip restores int8 speed
    for it at the cost of one elementwise op.
    """
    clipped: frozenset = frozenset()
    for name in [n for n in exporter.order if n in floated - forced and not plans[n].act_signed]:
        if time.monotonic() > deadline:
            break
        trial_floated, trial_clipped = floated - {name}, clipped | {name}
        if not exporter.fails(trial_floated, trial_clipped):
            floated, clipped = trial_floated, trial_clipped
    return floated, clipped


def _mark_fallback(plans: dict[str, LayerExport], floated: frozenset, clipped: frozenset,
                   forced: frozenset) -> None:
    for name in clipped:
        plans[name].act_clip = True
        plans[name].reason = "self-check: int8 with an explicit clip to its threshold (it clips on purpose)"
        logger.warning("export: %s: %s", name, plans[name].reason)
    for name in floated:
        plan = plans[name]
        plan.export = "fake-quant"
        plan.deploy_act_scale = plan.deploy_weight_scale = None  # no int8 scales are written
        plan.float_output = False
        if name in forced:
            plan.reason = "fake_quant_layers"
            continue
        plan.reason = (
            "self-check: its int8 deployment made the model disagree with the simulation"
            + (" (signed input: s8 kernels are inexact on CPUs without VNNI)" if plan.act_signed else "")
            + "; exported as float kernels on its fake-quantized input and weight"
        )
        logger.warning("export: %s kept in float: %s", name, plan.reason)


# ---------------------------------------------------------------------- building, saving, checking
@dataclass
class _Attempt:
    floated: frozenset  # layers exported with the fake-quant fallback
    clipped: frozenset  # int8 layers given an explicit clip by the self-check
    directory: str
    result: CheckResult | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "fallback_layers": sorted(self.floated),
            "clipped_layers": sorted(self.clipped),
            "check": None if self.result is None else self.result.to_dict(),
            "seconds": round(self.seconds, 2),
        }


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


class _Exporter:
    """Builds, saves and checks the export with a given set of layers kept in float (cached)."""

    def __init__(self, work, quanted, plans, weights, spec, staging, batches, reference, observed,
                 min_agreement, max_rel_l2, strict_int8, num_threads) -> None:
        self.work = work
        self.quanted = quanted
        self.plans = plans
        self.weights = weights
        self.spec = spec
        self.staging = staging
        self.batches = batches
        self.reference = reference
        self.order = [n for n in observed.order if n in plans]
        self.min_agreement = min_agreement
        self.max_rel_l2 = max_rel_l2
        self.strict_int8 = strict_int8
        self.num_threads = num_threads
        self.attempts: list[_Attempt] = []
        self.caveats: list[str] = []  # why this check proves less than usual (set by the caller)
        self._cache: dict[tuple[frozenset, frozenset], _Attempt] = {}
        self.residual_convs: set[str] | None = None  # found in the first traced program

    def order_all(self) -> list[str]:
        return self.order + [n for n in self.plans if n not in self.order]

    def build(self, floated: frozenset, clipped: frozenset = frozenset()) -> nn.Layer:
        """A copy of the model with int8 export layers (fake-quant ones for ``floated``)."""
        model = copy.deepcopy(self.work)
        copies = dict(iter_quanted_layers(model))
        swap: dict[int, nn.Layer] = {}
        for name, layer in copies.items():
            plan = self.plans[name]
            if plan.export == "float":
                swap[id(layer)] = layer.layer
            elif name in floated:
                swap[id(layer)] = _FAKE_QUANT_TYPES[layer.layer_type](layer, plan)
            else:
                swap[id(layer)] = _INT8_TYPES[layer.layer_type](
                    layer, plan, self.weights[name], clip=plan.act_clip or name in clipped
                )
        for parent in [model, *model.sublayers()]:
            for attr, child in list(parent._sub_layers.items()):
                if child is not None and id(child) in swap:
                    parent._sub_layers[attr] = swap[id(child)]
        return model

    def save(self, model: nn.Layer, directory: str) -> None:
        """Trace and save ``model``; int8 convolutions that feed a residual add get an fp32 output."""
        int8_convs = [layer for layer in model.sublayers() if isinstance(layer, _Int8Conv2D)]
        if self.residual_convs is None:
            self._trace(model, directory)
            ops = read_program_ops(os.path.join(directory, "model.pdmodel"))
            weights = residual_conv_weights(ops)
            self.residual_convs = {layer.export_name for layer in int8_convs if layer.weight_int8.name in weights}
            for name in self.residual_convs:
                self.plans[name].float_output = True
            if not self.residual_convs:
                return
        for layer in int8_convs:
            layer.float_output = layer.export_name in self.residual_convs
        self._trace(model, directory)

    def _trace(self, model: nn.Layer, directory: str) -> None:
        prefix = os.path.join(directory, "model")
        try:
            with paddle.pir_utils.DygraphOldIrGuard():
                paddle.jit.save(model, prefix, input_spec=list(self.spec))
        finally:
            if not paddle.in_dynamic_mode():  # never leave the caller in static mode
                paddle.disable_static()

    def attempt(
        self, floated: frozenset, clipped: frozenset = frozenset(), run_check: bool = True
    ) -> _Attempt:
        key = (floated, clipped)
        if key in self._cache:
            return self._cache[key]
        start = time.monotonic()
        directory = os.path.join(self.staging, f"attempt-{len(self.attempts)}")
        os.makedirs(directory)
        model = self.build(floated, clipped)
        self.save(model, directory)
        result = None
        if run_check:
            predictor, counts = load_int8_predictor(os.path.join(directory, "model"), self.num_threads)
            deployed = run_predictor(predictor, self.batches)
            del predictor
            expected = sum(p.calls for n, p in self.plans.items() if p.export == "int8" and n not in floated)
            comparison = compare_samples(deployed, self.reference, margin_rel_l2=self.max_rel_l2)
            result = judge(comparison.samples, comparison.rel_l2, comparison.top1_agreement, counts,
                           expected, self.min_agreement, self.max_rel_l2, self.strict_int8,
                           comparison=comparison, caveats=self.caveats + _tie_caveat(comparison))
            logger.info("export check, fake-quant %s, clipped %s: %s", sorted(floated) or "none",
                        sorted(clipped) or "none", result.summary())
        record = _Attempt(floated, clipped, directory, result, time.monotonic() - start)
        self.attempts.append(record)
        self._cache[key] = record
        return record

    def fails(self, floated: frozenset, clipped: frozenset = frozenset()) -> bool:
        """True while the deployed outputs miss the thresholds (``floated`` as fake-quant layers)."""
        return not self.attempt(floated, clipped).result.numerics_ok


# ---------------------------------------------------------------------- publishing
def _publish(directory: str, staging: str, prefix: str, report: ExportReport) -> dict[str, str]:
    """Move the chosen attempt's files into place, the JSON last with their SHA-256
    (``qtrainer.quant.publish``: a kill in between leaves a model our loaders refuse); returns
    ``{kind: path}``."""
    files, moves, obsolete = {}, {}, []
    for suffix in _MODEL_FILES:
        source = os.path.join(directory, "model" + suffix)
        if os.path.exists(source):
            files[suffix.lstrip(".").replace(".", "_")] = prefix + suffix
            moves[source] = prefix + suffix
        elif os.path.exists(prefix + suffix):
            obsolete.append(prefix + suffix)  # the earlier export's, not part of this one
    files["quant_json"] = prefix + _JSON_SUFFIX
    report.files = files
    content = json.loads(json.dumps(report.to_dict(), default=_json_default))
    report.sha256 = publish(moves, prefix + _JSON_SUFFIX, content, remove=obsolete)
    return files


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
