"""Deciding how each quantized layer is exported, before anything is traced.

``working_copy`` (a deep copy with fixed activation thresholds), ``observe_layers`` (the sample
batches through it: reference outputs, call order, which inputs are unsigned or shared) and
``plan_layers`` (per layer: int8 or float and why, the deploy scales and the int8 weight codes;
the rules are in ``docs/export-format.md``). ``mark_fallback`` records the self-check's choices.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import paddle
from paddle import nn

from qtrainer.quant.base import Quanter, qmax_for_bits
from qtrainer.quant.export.isa import u8_headroom
from qtrainer.quant.export.layers import INT8_TYPES, FrozenActQuanter
from qtrainer.quant.export.program import INT8_BITS
from qtrainer.quant.export.report import LayerExport
from qtrainer.quant.observers.absmax import MIN_SCALE
from qtrainer.quant.quanters.fake_quant import INT8_QMAX, FakeQuanter
from qtrainer.quant.transforms.wrap import QuantedLayer, iter_quanted_layers

__all__ = ["CLIP_FRACTION", "Observed", "working_copy", "observe_layers", "plan_layers", "mark_fallback", "matches", "threshold_of"]

logger = logging.getLogger(__name__)

# The u8 scale of an unsigned 8-bit activation with headroom (CPUs without VNNI): codes of [0, T]
# are 0..127, as in the simulation. For a VNNI target the scale is T itself: codes 0..255 on [0, T].
_U8_FACTOR = 255.0 / 127.0
#: ``clip_activations='auto'`` clips a layer's input explicitly before its int8 quantization when at
#: least this fraction of its sample inputs lies where the simulation clips but the deployed grid
#: would not (trained MobileNetV1 x0.25 on Fashion-MNIST, KL-calibrated PTQ, 10,000 test images,
#: agreement with the simulation in Paddle Inference: 97.12% unclipped, 99.75% with 1e-3 (3 of 28
#: layers clipped), 99.98% with 1e-4 (7 layers); each clip costs Paddle its int8-to-int8 chaining
#: there, and QAT's abs-max scales and the random-weight speed models stay below 1e-3).
CLIP_FRACTION = 1e-3
# A threshold this small means the layer only ever saw zeros; Paddle would leave it in float.
_TINY_SCALE = 1e3 * MIN_SCALE


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` matches one of the ``fnmatch`` patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def working_copy(model: nn.Layer) -> nn.Layer:
    """A deep copy in eval mode whose activation quanters no longer observe (fixed thresholds)."""
    work = copy.deepcopy(model)
    work.eval()
    unobserved = []
    for name, layer in iter_quanted_layers(work):
        quanter = layer.act_quanter
        if isinstance(quanter, Quanter) and not quanter.is_ready():
            unobserved.append(name)
            continue
        if isinstance(quanter, FakeQuanter):  # a fixed threshold: no observing, no recomputing
            layer.act_quanter = FrozenActQuanter(float(layer.act_scale().item()), layer.act_bits)
        weight = layer.weight_quanter
        if isinstance(weight, Quanter):  # a calibrating PTQ model neither observes nor quantizes
            if not weight.is_ready():
                weight.enable_observer(True)
            weight.enable_quant(True)
    if unobserved:
        raise ValueError(
            f"the activation quantizers of {', '.join(unobserved)} have seen no data, so they have no "
            "scale: train (QAT) or calibrate (PTQ) the model before exporting it"
        )
    return work


@dataclass
class Observed:
    """Per quantized layer, what the sample batches showed."""

    order: list[str]  # forward order of first calls
    calls: dict[str, int]
    input_min: dict[str, float]
    above_threshold: dict[str, float]  # fraction of input values with |x| > the threshold T
    shared: dict[str, list[str]]  # layer -> other layers quantizing the same input tensor


def observe_layers(work: nn.Layer, quanted: dict[str, QuantedLayer], batches) -> tuple[Observed, list[np.ndarray]]:
    """Reference outputs, and per layer: call order, calls per forward, min of its quantized input."""
    order: list[str] = []
    calls: dict[str, int] = {n: 0 for n in quanted}
    mins: dict[str, float] = {}
    first_inputs: dict[str, paddle.Tensor] = {}  # kept alive, so that identity comparisons hold
    above: dict[str, list[int]] = {}
    thresholds = {name: threshold_of(layer) for name, layer in quanted.items()}
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
        # the quanter sees the raw input, also where a residual block quantizes it for the layer
        user_preprocess = layer.act_preprocess is not None and not layer.act_pact
        target = layer.act_quanter if (user_preprocess or layer.input_quantized_outside) else layer
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
    return Observed(order, calls, mins, fractions, shared), reference


def threshold_of(layer: QuantedLayer) -> float:
    """The activation threshold T as a float (``TypeError`` naming the layer without ``scale()``)."""
    return float(layer.act_scale().reshape([-1])[0].item())


def plan_layers(quanted, observed: Observed, keep_float, clip_activations, target: str = "portable"):
    plans: dict[str, LayerExport] = {}
    weights: dict[str, np.ndarray] = {}
    headroom = u8_headroom(target)
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
        threshold = threshold_of(layer)
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
        low_bits = plan.act_bits < INT8_BITS
        full_grid = False
        if plan.act_signed:
            plan.deploy_act_scale = threshold * 127.0 / qmax
        elif not headroom and not low_bits and not layer.input_quantized_outside:
            # VNNI: the full u8 grid (finer than the simulation's step T/127, clipped at T as it is);
            # a residual block's input keeps the u8 grid its simulation adds (step T/127)
            plan.deploy_act_scale = threshold
            full_grid = True
        else:
            plan.deploy_act_scale = threshold * _U8_FACTOR * 127.0 / qmax
        plan.act_clip = clip_activations is True or (clip_activations == "auto" and (
            low_bits or (not layer.input_quantized_outside and not plan.act_pact  # PACT's clip is traced
                         and _deployment_would_not_clip(plan, full_grid))))
    _unify_shared_scales(plans)
    return plans, weights


def _deployment_would_not_clip(plan: LayerExport, full_grid: bool) -> bool:
    """True when the samples put at least ``CLIP_FRACTION`` of the layer's inputs where the
    simulation clips and the deployed int8 grid would not: above ``T`` on the u8 headroom grid
    (codes up to 255 reach ``2T``), or below ``-T`` for a signed input (s8 reaches code -128).
    A calibrator that clips on purpose does this (KL on the main command's MobileNetV1: 3 layers;
    its histogram and MSE thresholds and QAT's abs-max scales stayed below it everywhere)."""
    if (plan.above_threshold or 0.0) < CLIP_FRACTION:
        return False
    if plan.act_signed:
        return plan.input_min is not None and plan.input_min < -plan.act_scale * 127.5 / 127.0
    return not full_grid


def _float_reason(name, layer, plan, keep_float, threshold) -> str | None:
    if matches(name, keep_float):
        return "keep_float"
    if plan.type not in INT8_TYPES:
        return f"no int8 export for layer type {plan.type!r}"
    if plan.act_bits > INT8_BITS or plan.weight_bits > INT8_BITS:
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


def mark_fallback(plans: dict[str, LayerExport], floated: frozenset, clipped: frozenset,
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
