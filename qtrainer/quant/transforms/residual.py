"""Residual adds: quantize the identity input the way the deployed int8 graph does.

In a residual block ``out = branch(x) + x`` whose ``x`` is also the input of a quantized
convolution inside the block, Paddle Inference's oneDNN passes fuse the branch's last convolution
with the add and read ``x`` as int8 ``ResidualData``, on the grid of the scale ``x`` already carries
(that convolution's activation scale). The deployed add therefore computes ``branch(x) + fq(x)``,
not ``branch(x) + x``. The simulation follows: a forward pre-hook on the block replaces ``x`` by
``consumer.quantize_input(x)`` (the consumer convolution's own quantizer, observing ``x`` once),
and the consumer skips its own input quantization (``input_quantized_outside``). In the export
the same hook writes the consumer's quantize/dequantize pair, read by both the convolution and the
add, so there is one pair per tensor and the add need not be kept in float
(``docs/int8-fusion/README.md``).

The blocks are found from one forward of a copy of the model (``find_residual_sites``), run
lazily on the model's first call in dynamic mode (``enable_residual_quantization``), so that
``QAT.quantize(model)`` needs no example input. A block qualifies when the identity operand of
an add is the block's own input and exactly one quantized ``Conv2D`` inside the block, without an
activation preprocess (PACT or a user class), reads that same tensor. Other residual adds
(a projection shortcut, a Linear consumer, PACT) keep the float add; the export then keeps the
branch convolution's output in float (``qtrainer.quant.export.program.residual_conv_weights``).
No state is added: the hooks are found again after a resume, so checkpoints do not change.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import paddle
from paddle import nn

from qtrainer.quant.quanters.fake_quant import fake_quant

__all__ = [
    "ResidualSite",
    "find_residual_sites",
    "install_residual_sites",
    "enable_residual_quantization",
    "residual_sites_of",
]

_PENDING_ATTR = "_qt_residual_detection"  # on the model: "pending" / "done"
_CONSUMER_ATTR = "_qt_residual_consumer"  # on a block: the consumer's path inside the block
_UNSIGNED_ATTR = "_qt_residual_unsigned"  # on a block: its input is unsigned
#: u8 codes 0..255 on the step T/127 of an 8-bit activation threshold T (``export.plan._U8_FACTOR``)
_U8_RANGE = 255.0 / 127.0


@dataclass(frozen=True)
class ResidualSite:
    """A block whose input ``x`` is added to its output and quantized by ``consumer`` first."""

    block: str  # sublayer name of the block
    consumer: str  # path of the quantized convolution inside the block
    unsigned: bool = False  # the input was >= 0 (e.g. a relu output): the deployment's u8 grid


def _is_consumer(layer: nn.Layer) -> bool:
    return (
        getattr(layer, "layer_type", None) == "Conv2D"
        and callable(getattr(layer, "quantize_input", None))
        and getattr(layer, "act_preprocess", None) is None
    )


class _Recorder:
    """Records, during one forward, each layer's first input, the quantized inputs and the adds."""

    def __init__(self, model: nn.Layer) -> None:
        self.names = {id(layer): name for name, layer in model.named_sublayers(include_self=True)}
        self.stack: list[str] = []
        self.inputs: dict[str, int] = {}  # layer name -> id of its first input tensor
        self.consumer_inputs: dict[str, int] = {}  # quantized conv name -> id of its input
        self.outputs: dict[str, Any] = {}  # layer name -> its first output
        self.adds: list[tuple[int, int, tuple[str, ...]]] = []
        self.keep: dict[int, Any] = {}  # tensors kept alive so that ids stay unique
        self.handles = []
        for name, layer in model.named_sublayers(include_self=True):
            self.handles.append(layer.register_forward_pre_hook(self._pre))
            self.handles.append(layer.register_forward_post_hook(self._post))

    def _pre(self, layer, inputs):
        name = self.names[id(layer)]
        self.stack.append(name)
        if inputs and isinstance(inputs[0], paddle.Tensor):
            self.keep[id(inputs[0])] = inputs[0]
            self.inputs.setdefault(name, id(inputs[0]))
            if _is_consumer(layer):
                self.consumer_inputs.setdefault(name, id(inputs[0]))
        return None

    def _post(self, layer, inputs, output):
        if self.stack:
            self.stack.pop()
        if isinstance(output, paddle.Tensor):
            self.outputs.setdefault(self.names[id(layer)], output)
        return None

    def record_add(self, a, b) -> None:
        if isinstance(a, paddle.Tensor) and isinstance(b, paddle.Tensor) and self.stack:
            self.keep[id(a)], self.keep[id(b)] = a, b
            self.adds.append((id(a), id(b), tuple(self.stack)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _AddPatch:
    """Routes ``Tensor.__add__`` / ``__radd__`` / ``paddle.add`` through a recorder for one forward."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder
        self.saved = {}

    def __enter__(self) -> "_AddPatch":
        recorder = self.recorder
        for attr in ("__add__", "__radd__"):
            original = getattr(paddle.Tensor, attr)
            self.saved[attr] = original

            def patched(a, b, _original=original):
                recorder.record_add(a, b)
                return _original(a, b)

            setattr(paddle.Tensor, attr, patched)
        original_add = paddle.add
        self.saved["add"] = original_add

        def patched_add(x, y, name=None):
            recorder.record_add(x, y)
            return original_add(x, y, name=name)

        paddle.add = patched_add
        return self

    def __exit__(self, *exc) -> None:
        for attr in ("__add__", "__radd__"):
            setattr(paddle.Tensor, attr, self.saved[attr])
        paddle.add = self.saved["add"]


def find_residual_sites(model: nn.Layer, inputs: tuple) -> list[ResidualSite]:
    """The residual blocks of ``model`` whose identity input the int8 graph quantizes.

    Runs one float forward of a deep copy of ``model`` (eval mode, no gradient, the quanted layers
    computing float) on ``inputs``; the model itself is not touched.
    """
    work = copy.deepcopy(model)
    setattr(work, _PENDING_ATTR, "done")
    work.eval()
    for layer in work.sublayers():  # the quanted layers compute float: nothing observes or warns
        if hasattr(type(layer), "compute_float"):
            layer.compute_float = True
    recorder = _Recorder(work)
    try:
        with paddle.no_grad(), _AddPatch(recorder):
            work(*inputs)
    finally:
        recorder.remove()
    sites: list[ResidualSite] = []
    seen: set[str] = set()
    for a, b, stack in recorder.adds:
        if a == b:
            continue
        found = [site for site in (_site_for(recorder, t, stack) for t in (a, b)) if site is not None]
        if len(found) == 1 and found[0].block not in seen:
            seen.add(found[0].block)
            sites.append(found[0])
    return sites


def _site_for(recorder: _Recorder, tensor_id: int, stack: tuple[str, ...]) -> ResidualSite | None:
    """The innermost block on ``stack`` whose input is ``tensor_id``, if one conv inside reads it."""
    for block in reversed(stack):
        if not block:  # the model itself: its hooks are running while the sites are installed
            return None
        if recorder.inputs.get(block) != tensor_id:
            continue
        prefix = f"{block}." if block else ""
        readers = [name for name, t in recorder.consumer_inputs.items()
                   if t == tensor_id and name.startswith(prefix) and name != block]
        if len(readers) != 1:
            return None
        unsigned = bool(float(recorder.keep[tensor_id].min()) >= 0.0)
        output = recorder.outputs.get(block)
        if unsigned and (output is None or float(output.min()) < 0.0):
            # a u8 identity added into a signed output (no relu after the add, e.g. MobileNetV2 x0.25's
            # first block on the stem's relu6): Paddle's fused conv + add computes it wrongly (measured
            # on a trained model: rel. L2 vs the simulation 0.18 -> 0.67), so that add stays float
            return None
        return ResidualSite(block=block, consumer=readers[0][len(prefix):], unsigned=unsigned)
    return None


def _sublayer(root: nn.Layer, path: str) -> nn.Layer:
    layer = root
    for part in path.split(".") if path else ():
        layer = layer._sub_layers[part]
    return layer


def quantize_block_input(block: nn.Layer, inputs: tuple):
    """Forward pre-hook of a residual block: its input through its consumer's quantizer.

    An unsigned 8-bit input is deployed as u8 (codes 0..255 on the step ``T/127``), which keeps
    values up to ``2T`` where the quanter clips at ``T``; both the add and the consumer read it so
    in the deployment, so the simulation takes that grid too (after the quanter has observed).
    """
    consumer = _sublayer(block, getattr(block, _CONSUMER_ATTR))
    quantize = getattr(consumer, "quantize_input", None)
    if quantize is None or not inputs:  # exported as a plain float layer: nothing is quantized
        return None
    quanted = getattr(consumer, "quanted", consumer)
    if getattr(quanted, "compute_float", False):  # ``computing_float``: the float block
        return None
    x = inputs[0]
    y = quantize(x)
    if getattr(block, _UNSIGNED_ATTR, False) and paddle.in_dynamic_mode() and quanted.act_bits == 8:
        y = fake_quant(x, quanted.act_scale() * _U8_RANGE, 9)
    return (y, *inputs[1:])


def install_residual_sites(model: nn.Layer, sites: list[ResidualSite]) -> None:
    """Make ``model`` quantize the identity input of each site (hooks only, no new state)."""
    for site in sites:
        block = _sublayer(model, site.block)
        if getattr(block, _CONSUMER_ATTR, None) is not None:
            continue
        consumer = _sublayer(block, site.consumer)
        consumer.input_quantized_outside = True
        setattr(block, _CONSUMER_ATTR, site.consumer)
        setattr(block, _UNSIGNED_ATTR, site.unsigned)
        block.register_forward_pre_hook(quantize_block_input)


def _detect_on_first_forward(model: nn.Layer, inputs: tuple):
    if getattr(model, _PENDING_ATTR, None) != "pending" or not paddle.in_dynamic_mode():
        return None
    setattr(model, _PENDING_ATTR, "done")
    install_residual_sites(model, find_residual_sites(model, inputs))
    return None


def enable_residual_quantization(model: nn.Layer) -> None:
    """Find and install the residual sites of ``model`` on its first forward in dynamic mode."""
    setattr(model, _PENDING_ATTR, "pending")
    model.register_forward_pre_hook(_detect_on_first_forward)


def residual_sites_of(model: nn.Layer) -> list[ResidualSite]:
    """The sites installed in ``model`` (empty before its first forward)."""
    return [
        ResidualSite(block=name, consumer=getattr(layer, _CONSUMER_ATTR),
                     unsigned=getattr(layer, _UNSIGNED_ATTR, False))
        for name, layer in model.named_sublayers(include_self=True)
        if getattr(layer, _CONSUMER_ATTR, None) is not None
    ]
