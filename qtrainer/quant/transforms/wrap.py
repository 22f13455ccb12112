"""Layer wrapping: put quanters around every quantizable ``Conv2D`` / ``Linear`` of a model.

``quantize_model(model, config)`` replaces, in place, each selected layer by a ``QuantedConv2D``
or ``QuantedLinear`` whose forward is::

    x = act_preprocess(x)          # optional (PACT, or a user class)
    x = act_quanter(x)             # fake quant of the layer input
    w = weight_preprocess(weight)  # optional (PACT, or a user class)
    w = weight_quanter(w)          # fake quant of the weight (channel-wise by default)
    return conv2d / linear (x, w, bias)  # same arguments as the float layer

(With the built-in PACT the first two lines run fused as ``act_quanter.clip_and_quantize(x)``,
which equals ``act_quanter(act_preprocess(x))``.)

The wrapper registers the float layer's own ``weight`` and ``bias`` Parameter objects under the
same names, so the optimizer keeps training them and their ``state_dict`` keys do not change
(``features.0.weight`` stays ``features.0.weight``). The quantization state adds keys under the
wrapper: ``<name>.act_quanter.observer.accum`` / ``.state`` (moving average),
``<name>.act_quanter.observer.absmax`` (abs max), ``<name>.weight_quanter.observer.absmax``,
``<name>.act_preprocess.alpha`` (+ ``.observer.*``, ``.warmup_count``) with PACT.

Stable attributes of a quanted layer (the export relies on them):

* ``layer`` -- the original float layer (sharing ``weight``/``bias`` with the wrapper);
  ``layer_type`` -- ``'Conv2D'`` or ``'Linear'``.
* ``act_preprocess``, ``act_quanter``, ``weight_preprocess``, ``weight_quanter`` -- sublayers
  (the preprocess ones may be ``None``).
* ``act_bits``, ``weight_bits`` -- ints; ``act_axis`` (always ``None``: per tensor),
  ``weight_axis`` (``0`` for Conv2D, ``1`` for Linear, ``None`` with ``'abs_max'`` weights).
* ``act_pact``, ``weight_pact`` -- True when the built-in PACT is used.
* ``act_scale()`` -- Tensor ``[1]``: the activation threshold ``T`` (``|alpha|`` with PACT).
* ``weight_scale()`` -- Tensor ``[1]`` or ``[channels]``: the weight threshold(s), recomputed
  from the current weight (a training step changes the weight after the last forward).
* ``effective_weight()`` -- the float weight after ``weight_preprocess`` (what gets quantized);
  ``quantized_weight()`` -- its fake-quantized value.
All scales follow ``qtrainer.quant.base``: threshold ``T``, ``qmax = 2**(bits-1) - 1``.
``quant_sync_modes(model)`` lists the state keys that data-parallel ranks must all-reduce.

The training forward is tuned for dygraph (in-place rounding, fused kernels, ``PyLayer``). In eval
mode it also traces: ``paddle.jit.to_static`` / ``paddle.jit.save`` (PIR) give the same outputs,
as a float graph of fake quant-dequant ops. (Under ``DygraphOldIrGuard`` Paddle 3.3 cannot trace
``paddle.round`` at all, so a legacy-IR export must build its graph from the attributes above.)
"""
from __future__ import annotations

import inspect
import logging
import contextlib
from collections import Counter
from typing import Iterable, Iterator

import paddle
from paddle import nn
import paddle.nn.functional as F

from qtrainer.quant.base import Quanter
from qtrainer.quant.config import SUPPORTED_LAYER_TYPES, QuantConfig
from qtrainer.quant.observers.absmax import (
    AbsMaxObserver,
    MovingAverageAbsMaxObserver,
    PerChannelAbsMaxObserver,
)
from qtrainer.quant.quanters.fake_quant import FakeQuanter
from qtrainer.quant.quanters.fused import FusedAbsMaxQuanter
from qtrainer.quant.quanters.pact import PACT, PACTQuanter
from qtrainer.quant.transforms.residual import enable_residual_quantization

__all__ = [
    "QuantedLayer",
    "QuantedConv2D",
    "QuantedLinear",
    "quantize_model",
    "iter_quanted_layers",
    "check_user_class",
    "quant_sync_modes",
    "computing_float",
]

logger = logging.getLogger(__name__)

_WEIGHT_CHANNEL_AXIS = {"Conv2D": 0, "Linear": 1}
_FLOAT_TYPES = {"Conv2D": nn.Conv2D, "Linear": nn.Linear}


class QuantedLayer(nn.Layer):
    """Base of the quanted layers: quanters around a float layer (see the module docstring)."""

    layer_type = ""

    def __init__(
        self,
        layer: nn.Layer,
        act_quanter: nn.Layer,
        weight_quanter: nn.Layer,
        act_preprocess: nn.Layer | None = None,
        weight_preprocess: nn.Layer | None = None,
        act_bits: int = 8,
        weight_bits: int = 8,
        weight_axis: int | None = None,
    ) -> None:
        super().__init__()
        self._float_layer = (layer,)  # a tuple: not a sublayer, its parameters are registered below
        self.weight = layer.weight
        self.bias = layer.bias
        self.act_preprocess = act_preprocess
        self.act_quanter = act_quanter
        self.weight_preprocess = weight_preprocess
        self.weight_quanter = weight_quanter
        self.act_bits = int(getattr(act_quanter, "quant_bits", act_bits))
        self.weight_bits = int(getattr(weight_quanter, "quant_bits", weight_bits))
        self.act_axis = None
        self.weight_axis = getattr(weight_quanter, "axis", weight_axis)

    @property
    def layer(self) -> nn.Layer:
        """The wrapped float layer (its parameters are this wrapper's ``weight``/``bias``)."""
        return self._float_layer[0]

    @property
    def act_pact(self) -> bool:
        """True when the activation goes through the built-in PACT and its ``PACTQuanter``."""
        q = self.act_quanter
        return isinstance(q, PACTQuanter) and q.pact is self.act_preprocess

    @property
    def weight_pact(self) -> bool:
        return isinstance(self.weight_preprocess, PACT)

    #: True when a residual block quantizes this layer's input before calling it
    #: (``qtrainer.quant.transforms.residual``); the layer then uses its input as it is.
    input_quantized_outside = False
    #: True inside ``computing_float``: the layer computes its float layer on the raw input
    #: (no activation preprocess or quantization, the float weight); nothing observes.
    compute_float = False

    def quantize_input(self, x: paddle.Tensor) -> paddle.Tensor:
        """The layer input as the layer quantizes it (activation preprocess, then quanter)."""
        if self.compute_float:
            return x
        if self.act_pact:  # built-in PACT: clip and quantize in one fused step, same result
            return self.act_quanter.clip_and_quantize(x)
        if self.act_preprocess is not None:
            x = self.act_preprocess(x)
        return self.act_quanter(x)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.compute_float:
            return self._compute(x, self.weight)
        if not self.input_quantized_outside:
            x = self.quantize_input(x)
        w = self.weight
        if self.weight_preprocess is not None:
            w = self.weight_preprocess(w)
        w = self.weight_quanter(w)
        return self._compute(x, w)

    def _compute(self, x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ export contract
    def act_scale(self) -> paddle.Tensor:
        """The activation threshold (shape ``[1]``)."""
        return _scale_of(self.act_quanter, "act_quanter", self.full_name())

    def effective_weight(self) -> paddle.Tensor:
        """The float weight after ``weight_preprocess`` (no gradient)."""
        with paddle.no_grad():
            if self.weight_preprocess is None:
                return self.weight.detach()
            return self.weight_preprocess(self.weight.detach()).detach()

    def weight_scale(self) -> paddle.Tensor:
        """The weight threshold(s), from the current weight when the quanter observes weights."""
        quanter = self.weight_quanter
        if isinstance(quanter, Quanter) and quanter.observing:
            quanter.observe(self.effective_weight())
        return _scale_of(quanter, "weight_quanter", self.full_name())

    def quantized_weight(self) -> paddle.Tensor:
        """The fake-quantized weight as the forward uses it (no gradient; a user weight quanter's
        forward is called, in the layer's current mode)."""
        w = self.effective_weight()
        with paddle.no_grad():
            if isinstance(self.weight_quanter, FakeQuanter):
                return self.weight_quanter.quantize_with(w, self.weight_scale())
            return self.weight_quanter(w).detach()

    def extra_repr(self) -> str:
        return (
            f"{self.layer_type}, act_bits={self.act_bits}, weight_bits={self.weight_bits}, "
            f"weight_axis={self.weight_axis}"
        )


class QuantedConv2D(QuantedLayer):
    """A ``Conv2D`` (plain, grouped or depthwise) with quantized input and weight."""

    layer_type = "Conv2D"

    def _compute(self, x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
        conv = self.layer
        padding = conv._padding
        if conv._padding_mode != "zeros":
            x = F.pad(
                x,
                conv._reversed_padding_repeated_twice,
                mode=conv._padding_mode,
                data_format=conv._data_format,
            )
            padding = 0
        return F.conv2d(
            x,
            weight,
            bias=self.bias,
            stride=conv._stride,
            padding=padding,
            dilation=conv._dilation,
            groups=conv._groups,
            data_format=conv._data_format,
        )


class QuantedLinear(QuantedLayer):
    """A ``Linear`` with quantized input and weight (weight ``[in, out]``, channel axis 1)."""

    layer_type = "Linear"

    def _compute(self, x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
        return F.linear(x, weight, self.bias)


_QUANTED_TYPES = {"Conv2D": QuantedConv2D, "Linear": QuantedLinear}


def _scale_of(quanter: nn.Layer, role: str, owner: str) -> paddle.Tensor:
    scale = getattr(quanter, "scale", None)
    if not callable(scale):
        raise TypeError(
            f"{owner}.{role} ({type(quanter).__name__}) has no scale() method; a quanter must "
            "provide scale() returning its threshold so the model can be exported"
        )
    return scale().detach()


# ---------------------------------------------------------------------- user classes
def check_user_class(cls: object, argument: str) -> None:
    """Raise ``TypeError`` unless ``cls`` is ``None`` or a ``paddle.nn.Layer`` subclass."""
    if cls is None:
        return
    if not (inspect.isclass(cls) and issubclass(cls, nn.Layer)):
        what = f"an instance of {type(cls).__name__}" if not inspect.isclass(cls) else cls.__name__
        raise TypeError(
            f"{argument} must be a paddle.nn.Layer subclass (the class itself, not an "
            f"instance), got {what}"
        )


def _construct(cls: type, argument: str, **candidates) -> nn.Layer:
    """Instantiate a user class, passing the candidate keyword arguments its __init__ accepts."""
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in candidates.items() if takes_any or k in params}
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"could not construct {argument}={cls.__name__}({kwargs}): {err}") from err
    if not callable(getattr(obj, "forward", None)):
        raise TypeError(f"{argument}={cls.__name__} instances have no forward method")
    return obj


# ---------------------------------------------------------------------- building one layer
def _build_quanted(
    layer_type: str,
    layer: nn.Layer,
    config: QuantConfig,
    weight_preprocess: type | None,
    act_preprocess: type | None,
    weight_quantize: type | None,
    act_quantize: type | None,
) -> QuantedLayer:
    a_bits, w_bits = config.activation_bits, config.weight_bits
    channel_wise = config.weight_quantize_type == "channel_wise_abs_max"
    w_axis = _WEIGHT_CHANNEL_AXIS[layer_type] if channel_wise else None

    # activation preprocess + quanter
    a_pre = None
    if act_preprocess is not None:
        a_pre = _construct(act_preprocess, "act_preprocess")
    elif config.activation_preprocess_type == "PACT":
        a_pre = PACT(
            init_value=config.pact_init,
            lr_mult=config.pact_lr_mult,
            decay=config.pact_decay,
            warmup_steps=config.pact_warmup_steps,
            moving_rate=config.moving_rate,
        )
    if act_quantize is not None:
        a_q = _construct(act_quantize, "act_quantize", quant_bits=a_bits, axis=None)
    elif isinstance(a_pre, PACT):
        a_q = PACTQuanter(a_pre, quant_bits=a_bits)
    elif config.activation_quantize_type == "moving_average_abs_max":
        a_q = FakeQuanter(MovingAverageAbsMaxObserver(a_bits, config.moving_rate), observe="train")
    else:
        a_q = FakeQuanter(AbsMaxObserver(a_bits), observe="train")

    # weight preprocess + quanter
    w_pre = None
    if weight_preprocess is not None:
        w_pre = _construct(weight_preprocess, "weight_preprocess")
    elif config.weight_preprocess_type == "PACT":
        init = max(float(layer.weight.detach().abs().max()), 1e-8)
        w_pre = PACT(init_value=init, lr_mult=config.pact_lr_mult, decay=config.pact_decay)
    if weight_quantize is not None:
        w_q = _construct(weight_quantize, "weight_quantize", quant_bits=w_bits, axis=w_axis)
    elif channel_wise:
        channels = layer.weight.shape[w_axis]
        w_q = FusedAbsMaxQuanter(PerChannelAbsMaxObserver(w_bits, w_axis, channels), observe="always",
                                 int8_grid=True)
    else:
        w_q = FusedAbsMaxQuanter(AbsMaxObserver(w_bits), observe="always", int8_grid=True)

    return _QUANTED_TYPES[layer_type](
        layer,
        act_quanter=a_q,
        weight_quanter=w_q,
        act_preprocess=a_pre,
        weight_preprocess=w_pre,
        act_bits=a_bits,
        weight_bits=w_bits,
        weight_axis=w_axis,
    )


# ---------------------------------------------------------------------- the model walk
def _walk(layer: nn.Layer, prefix: str = "", skipped: bool = False, matcher=None):
    """Yield ``(parent, attr, name, child, skipped)`` for every child slot (shared layers repeat)."""
    for attr, child in list(layer._sub_layers.items()):
        if child is None:
            continue
        name = f"{prefix}.{attr}" if prefix else attr
        skip = skipped or getattr(child, "skip_quant", False) is True
        if matcher is not None and matcher.matches(name):
            skip = True
        yield layer, attr, name, child, skip
        yield from _walk(child, name, skip, matcher)


def _type_name_of(layer: nn.Layer, types: list[str]) -> str | None:
    for name in types:
        if isinstance(layer, _FLOAT_TYPES[name]):
            return name
    return None


def iter_quanted_layers(model: nn.Layer) -> Iterator[tuple[str, QuantedLayer]]:
    """Yield ``(name, quanted layer)`` for every quanted layer of ``model`` (each once)."""
    if isinstance(model, QuantedLayer):
        yield "", model
    for name, sub in model.named_sublayers():
        if isinstance(sub, QuantedLayer):
            yield name, sub


@contextlib.contextmanager
def computing_float(model: nn.Layer, names: Iterable[str] | None = None) -> Iterator[list[str]]:
    """Inside the ``with``, the quanted layers named (default: all) compute float and observe nothing.

    Each computes its float layer on its raw input with the float weight, also where a residual
    block quantizes the input for it. Yields the names switched; unknown names raise ``KeyError``.
    """
    layers = dict(iter_quanted_layers(model))
    chosen = list(layers) if names is None else list(names)
    unknown = [n for n in chosen if n not in layers]
    if unknown:
        raise KeyError(f"computing_float: no quantized layer named {unknown}; the model has {sorted(layers)}")
    previous = {n: layers[n].compute_float for n in chosen}
    try:
        for name in chosen:
            layers[name].compute_float = True
        yield chosen
    finally:
        for name, value in previous.items():
            layers[name].compute_float = value


def quant_sync_modes(model: nn.Layer) -> dict[str, str]:
    """``{state_dict key: 'max' | 'mean'}`` for the quantization state that ranks must agree on.

    Data-parallel training does not synchronise observer buffers (each rank sees its own batches),
    nor a PACT ``alpha`` set from data during its warm-up; all-reducing these keys with the given
    operation (then ``mean`` of the moving-average ``accum``/``state`` pair keeps their ratio an
    average scale) makes every rank quantize alike. Layers without ``sync_modes()`` (user
    quanters) are not listed.
    """
    modes: dict[str, str] = {}
    for name, sub in model.named_sublayers():
        get = getattr(sub, "sync_modes", None)
        if callable(get):
            for key, mode in get().items():
                modes[f"{name}.{key}" if name else key] = mode
    return modes


def quantize_model(
    model: nn.Layer,
    config: QuantConfig | dict | None = None,
    weight_preprocess: type | None = None,
    act_preprocess: type | None = None,
    weight_quantize: type | None = None,
    act_quantize: type | None = None,
) -> list[tuple[str, QuantedLayer]]:
    """Replace the quantizable layers of ``model`` in place; return ``[(name, quanted layer)]``.

    The four class arguments follow the contract in ``qtrainer.quant.methods.qat.QAT``.
    """
    if not isinstance(model, nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    config = QuantConfig.from_dict(config)
    for cls, argument in (
        (weight_preprocess, "weight_preprocess"),
        (act_preprocess, "act_preprocess"),
        (weight_quantize, "weight_quantize"),
        (act_quantize, "act_quantize"),
    ):
        check_user_class(cls, argument)
    if act_preprocess is not None and config.activation_preprocess_type:
        logger.warning(
            "act_preprocess=%s replaces activation_preprocess_type=%r",
            act_preprocess.__name__,
            config.activation_preprocess_type,
        )
    if weight_preprocess is not None and config.weight_preprocess_type:
        logger.warning(
            "weight_preprocess=%s replaces weight_preprocess_type=%r",
            weight_preprocess.__name__,
            config.weight_preprocess_type,
        )

    already = [name or type(model).__name__ for name, _ in iter_quanted_layers(model)]
    if already:
        raise ValueError(
            f"model {type(model).__name__} is already quantized (quanted layers: "
            f"{', '.join(already[:5])}{', ...' if len(already) > 5 else ''}); quantize each "
            "model once"
        )
    types = config.quantizable_layer_type
    if _type_name_of(model, types) is not None:
        raise ValueError(
            f"model is itself a {type(model).__name__}; quantize_model replaces sublayers in "
            "place, so put it in a container first (e.g. paddle.nn.Sequential(model))"
        )

    matcher = config.skip_matcher()
    replacements: dict[int, QuantedLayer] = {}
    result: list[tuple[str, QuantedLayer]] = []
    skipped_names: list[str] = []
    contents: Counter = Counter()
    slots = list(_walk(model, matcher=matcher))
    for parent, attr, name, child, skip in slots:
        contents[type(child).__name__] += 1
        type_name = _type_name_of(child, types)
        if type_name is None:
            continue
        if type(child).forward is not _FLOAT_TYPES[type_name].forward:
            logger.warning(
                "%s (%s) overrides forward; it is left in float", name, type(child).__name__
            )
            continue
        if skip:
            skipped_names.append(name)
            continue
        quanted = replacements.get(id(child))
        if quanted is None:
            quanted = _build_quanted(
                type_name,
                child,
                config,
                weight_preprocess,
                act_preprocess,
                weight_quantize,
                act_quantize,
            )
            replacements[id(child)] = quanted
            result.append((name, quanted))
        setattr(parent, attr, quanted)

    for pattern in matcher.unused():
        logger.warning("skip pattern %r matched no layer of %s", pattern, type(model).__name__)
    if skipped_names:
        logger.info("not quantized (skipped): %s", ", ".join(skipped_names))
    if not result:
        found = ", ".join(f"{t} x{n}" for t, n in sorted(contents.items())) or "no sublayers"
        detail = (
            f"; {len(skipped_names)} matching layer(s) were skipped by skip_patterns/skip_quant: "
            f"{', '.join(skipped_names[:10])}"
            if skipped_names
            else ""
        )
        raise ValueError(
            f"found no layer to quantize in {type(model).__name__}: looked for "
            f"{', '.join(types)} (quantizable_layer_type; supported: "
            f"{', '.join(SUPPORTED_LAYER_TYPES)}); the model contains: {found}{detail}"
        )
    if config.quantize_residual_inputs:
        enable_residual_quantization(model)
    logger.info("quantized %d layer(s) of %s", len(result), type(model).__name__)
    return result
