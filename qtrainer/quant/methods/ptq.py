"""``PTQ``: the seed-compatible front door to static post-training quantization.

Usage (the seed's example, with qtrainer's import)::

    from qtrainer.quant import PTQ
    ptq = PTQ()                                  # KL activations, per-channel abs-max weights
    quant_model = ptq.quantize(fp32_model)       # a copy, in eval mode, ready to calibrate
    with paddle.no_grad():                       # calibration: plain forward passes
        for images, _ in calibration_loader:
            quant_model(images)
    ptq.save_quantized_model(quant_model, './quant_model', input_spec=[...])

A PTQ model goes through three states (``calibration_state(model)``):

* ``'calibrating'`` (after ``quantize``): every quantizable ``Conv2D``/``Linear`` is wrapped
  (``qtrainer.quant.transforms.wrap``); its activation quanter is a ``FakeQuanter`` holding the
  chosen calibrator (``qtrainer.quant.observers``) in ``observe='always'`` mode with quantization off,
  and its weight quanter is off too. So each forward feeds the calibrators the float model's layer
  inputs and returns the float model's output.
* ``'paused'``: as calibrating, but the calibrators do not observe (``pause_calibration``; the
  ``PTQCallback`` pauses across the Trainer's sanity check so validation data never calibrates).
* ``'frozen'`` (after ``freeze``, which ``save_quantized_model`` calls when needed): every
  threshold is fixed, activations and weights are fake-quantized; this simulates the int8 model.

``calibrate(model, loader)`` runs the forward passes for you (eval mode, no gradient, optional
progress bar); ``qtrainer.quant.diagnostics.sync.reduce_calibration_stats`` combines the statistics
of data-parallel ranks; ``calibrate_and_freeze`` does calibrate, reduce, freeze and the per-layer
report in one call (what ``PTQCallback`` runs).
"""
from __future__ import annotations

import copy
import logging
import math
import sys
from typing import Any, Callable, Iterable

import paddle
from paddle import nn

from qtrainer._checks import check_positive_int
from qtrainer.data.iteration import close_iterator, guard_iterator, loader_length
from qtrainer.quant.base import Quanter
from qtrainer.quant.config import QuantConfig
from qtrainer.quant.export.orchestration import export_quantized_model
from qtrainer.quant.observers.calibrators import (
    ACTIVATION_CALIBRATORS,
    calibrator_kwargs,
    make_activation_calibrator,
)
from qtrainer.quant.quanters.fake_quant import FakeQuanter
from qtrainer.quant.transforms.fuse import EvalMode, fuse_conv_bn
from qtrainer.quant.transforms.wrap import QuantedLayer, _type_name_of, _walk, iter_quanted_layers, quantize_model

__all__ = [
    "PTQ",
    "WEIGHT_QUANTIZERS",
    "PTQ_EXTRA_KWARGS",
    "calibrate",
    "calibration_layers",
    "unfrozen_layers",
    "calibration_state",
    "freeze",
    "pause_calibration",
    "resume_calibration",
    "state_of",
]

logger = logging.getLogger(__name__)

#: Seed weight quantizer names -> ``QuantConfig.weight_quantize_type``.
WEIGHT_QUANTIZERS = {
    "AbsmaxQuantizer": "abs_max",
    "PerChannelAbsmaxQuantizer": "channel_wise_abs_max",
}
#: Keyword arguments of ``PTQ`` that are not activation-quantizer arguments (qtrainer extras).
PTQ_EXTRA_KWARGS = ("weight_bits", "quantizable_layer_type", "skip_patterns")
_CALIBRATOR_TYPES = tuple(ACTIVATION_CALIBRATORS.values())

CALIBRATING, PAUSED, FROZEN = "calibrating", "paused", "frozen"


class PTQ:
    """Static post-training quantization, with PaddleSlim's ``PTQ`` signature.

    Args:
        activation_quantizer: how activation thresholds are calibrated, one of
            ``'KLQuantizer'`` (default: entropy calibration), ``'HistQuantizer'`` (percentile),
            ``'AbsmaxQuantizer'`` (largest value seen), ``'MSEQuantizer'`` (least squared error).
            The reference's misspelt keyword ``cactivation_quantizer`` is accepted too.
        weight_quantizer: ``'PerChannelAbsmaxQuantizer'`` (default: one threshold per output
            channel) or ``'AbsmaxQuantizer'`` (one per weight tensor).
        **kwargs: the activation quantizer's arguments -- ``quant_bits=8`` (all of them) and
            ``bins=1024``, ``upsample_bins=64`` (KL, Hist, MSE; see
            ``qtrainer.quant.observers.histogram.HistogramCalibrator`` for exactly what they mean),
            ``hist_percent=0.99999`` (Hist: the fraction of ``|x|`` kept below the threshold) --
            and qtrainer's extras: ``weight_bits=8``, ``quantizable_layer_type=['Conv2D',
            'Linear']`` and ``skip_patterns=[]`` (layer names not to quantize, as in
            ``qtrainer.quant.config``).

    Raises:
        ValueError: an unknown quantizer name (the valid ones are listed) or a bad value.
        TypeError: a keyword argument that neither the chosen activation quantizer nor PTQ takes.

    Attributes:
        config: the ``QuantConfig`` used to wrap the layers.
        fused_pairs: the ``(conv_name, bn_name)`` pairs folded by the last ``quantize`` call.
    """

    def __init__(
        self,
        activation_quantizer: str = "KLQuantizer",
        weight_quantizer: str = "PerChannelAbsmaxQuantizer",
        **kwargs: Any,
    ) -> None:
        if "cactivation_quantizer" in kwargs:  # the reference document's spelling
            misspelt = kwargs.pop("cactivation_quantizer")
            if activation_quantizer not in ("KLQuantizer", misspelt):
                raise ValueError(
                    f"PTQ got activation_quantizer={activation_quantizer!r} and "
                    f"cactivation_quantizer={misspelt!r}; give one of them"
                )
            activation_quantizer = misspelt
        if activation_quantizer not in ACTIVATION_CALIBRATORS:
            raise ValueError(
                f"PTQ: unknown activation_quantizer {activation_quantizer!r}; use one of "
                f"{list(ACTIVATION_CALIBRATORS)}"
            )
        if weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(
                f"PTQ: unknown weight_quantizer {weight_quantizer!r}; use one of {list(WEIGHT_QUANTIZERS)}"
            )
        accepted = calibrator_kwargs(ACTIVATION_CALIBRATORS[activation_quantizer])
        unknown = [k for k in kwargs if k not in accepted and k not in PTQ_EXTRA_KWARGS]
        if unknown:
            raise TypeError(_unknown_kwargs_message(unknown, activation_quantizer, accepted))
        self.activation_quantizer = activation_quantizer
        self.weight_quantizer = weight_quantizer
        self.activation_kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        extras = {k: v for k, v in kwargs.items() if k in PTQ_EXTRA_KWARGS}
        # bad values (bins=0, hist_percent=2, quant_bits=1, ...) fail here, not at quantize time
        try:
            probe = self.make_calibrator()
        except (TypeError, ValueError) as err:
            raise type(err)(f"PTQ(activation_quantizer={activation_quantizer!r}): {err}") from None
        self.config = QuantConfig.from_dict(
            {
                "weight_quantize_type": WEIGHT_QUANTIZERS[weight_quantizer],
                "activation_bits": probe.quant_bits,
                **extras,
            },
            source="PTQ arguments",
        )
        # the result is deployed by save_quantized_model: refuse what the int8 export cannot run
        self.config.require_deployable_bits(
            "PTQ arguments (quant_bits / weight_bits)"
        )
        self.fused_pairs: list[tuple[str, str]] = []

    def make_calibrator(self) -> nn.Layer:
        """A new activation calibrator with this PTQ's settings."""
        return make_activation_calibrator(self.activation_quantizer, **self.activation_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The arguments as plain data (what ``PTQ(**d)`` rebuilds)."""
        config = self.config.to_dict()
        extras = {k: config[k] for k in PTQ_EXTRA_KWARGS}
        return {"activation_quantizer": self.activation_quantizer, "weight_quantizer": self.weight_quantizer,
                **self.activation_kwargs, **extras}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"PTQ({args})"

    # ------------------------------------------------------------------ the three steps
    def quantize(
        self,
        model: nn.Layer,
        inplace: bool = False,
        fuse: bool = False,
        fuse_list: list | None = None,
    ) -> nn.Layer:
        """Prepare ``model`` for calibration; return the model to calibrate.

        Args:
            model: the float model (any ``paddle.nn.Layer`` with ``Conv2D``/``Linear`` layers).
            inplace: change ``model`` itself; by default a deep copy is quantized and ``model``
                is left as it was.
            fuse: fold each ``Conv2D`` -> ``BatchNorm2D`` pair first (``qtrainer.quant.transforms.fuse``),
                using the batch norms' running statistics (eval-mode behaviour).
            fuse_list: the pairs to fold, ``[[conv_name, bn_name], ...]`` with names from
                ``model.named_sublayers()``; ``None`` finds them automatically.

        The result is in eval mode and in the ``'calibrating'`` state (module docstring): run
        calibration batches through it, then ``save_quantized_model`` (or ``freeze``).

        Raises:
            ValueError: the model is already quantized, has no quantizable layer, or
                ``fuse_list`` is wrong (names that are not sublayers, pairs that are not
                Conv2D -> BatchNorm). The input model is unchanged when this raises.
        """
        if not isinstance(model, nn.Layer):
            raise TypeError(f"PTQ.quantize: model must be a paddle.nn.Layer, got {type(model).__name__}")
        already = [name or type(model).__name__ for name, _ in iter_quanted_layers(model)]
        if already:
            raise ValueError(
                f"PTQ.quantize: {type(model).__name__} is already quantized (quantized layers: "
                f"{', '.join(already[:5])}{', ...' if len(already) > 5 else ''}); quantize a float model"
            )
        if fuse_list is not None and not fuse:
            logger.warning("PTQ.quantize: fuse_list is ignored because fuse=False")
        if inplace and fuse:
            _require_quantizable(model, self.config)  # before folding changes the model
        if not inplace:
            model = copy.deepcopy(model)
        model.eval()
        self.fused_pairs = fuse_conv_bn(model, fuse_list) if fuse else []
        quanted = quantize_model(model, self.config)
        for _, layer in quanted:
            layer.act_quanter = FakeQuanter(self.make_calibrator(), observe="always", quantize=False)
            layer.weight_quanter.set_mode(observe="never", quantize=False)
        model.eval()  # the new wrappers and quanters too
        logger.info(
            "PTQ: %d layer(s) ready for calibration with %s%s",
            len(quanted), self.activation_quantizer,
            f" ({len(self.fused_pairs)} Conv2D+BatchNorm pairs fused)" if fuse else "",
        )
        return model

    def freeze(self, model: nn.Layer) -> nn.Layer:
        """End calibration: fix every threshold and start quantizing (see ``freeze``)."""
        return freeze(model)

    def save_quantized_model(
        self, model: nn.Layer, path: str, input_spec: list | None = None, **kwargs: Any
    ) -> Any:
        """Freeze ``model`` if it is still calibrating, then export it for Paddle Inference.

        ``path`` is a file prefix; ``kwargs`` go to ``qtrainer.quant.export_quantized_model``
        (e.g. ``sample_inputs``: real batches for its int8 self-check). Returns its report.

        Raises:
            ValueError: ``model`` was not prepared by ``PTQ.quantize``.
            RuntimeError: no calibration batch was run through ``model``.
        """
        if not isinstance(model, nn.Layer):
            raise TypeError(f"save_quantized_model: model must be a paddle.nn.Layer, got {type(model).__name__}")
        freeze(model)
        return export_quantized_model(model, path, input_spec=input_spec, **kwargs)


def _unknown_kwargs_message(unknown: list[str], chosen: str, accepted: list[str]) -> str:
    owners = {
        key: [name for name, cls in ACTIVATION_CALIBRATORS.items() if key in calibrator_kwargs(cls)]
        for key in unknown
    }
    details = "; ".join(
        f"{key!r} belongs to {', '.join(names)}" if names else f"{key!r} is not a PTQ argument"
        for key, names in owners.items()
    )
    return (
        f"PTQ: activation_quantizer={chosen!r} does not take {', '.join(map(repr, unknown))} ({details}). "
        f"{chosen} takes {accepted}; PTQ also takes {list(PTQ_EXTRA_KWARGS)}"
    )


def _require_quantizable(model: nn.Layer, config: QuantConfig) -> None:
    """Raise the wrapping's 'no layer to quantize' error without changing ``model``."""
    types = config.quantizable_layer_type
    for _, _, _, child, skip in _walk(model, matcher=config.skip_matcher()):
        if not skip and _type_name_of(child, types) is not None:
            return
    quantize_model(model, config)  # raises its detailed error, having changed nothing


# ---------------------------------------------------------------------- states
def calibration_layers(model: nn.Layer) -> list[tuple[str, QuantedLayer]]:
    """``(name, layer)`` of every quantized layer whose activation quanter holds a PTQ calibrator."""
    return [
        (name, layer) for name, layer in iter_quanted_layers(model)
        if isinstance(layer.act_quanter, FakeQuanter)
        and isinstance(layer.act_quanter.observer, _CALIBRATOR_TYPES)
    ]


def unfrozen_layers(model: nn.Layer) -> list[str]:
    """Names of the PTQ layers still calibrating or paused (not yet ``freeze``-d); empty for QAT models."""
    return [name for name, layer in calibration_layers(model) if state_of(layer) != FROZEN]


def _layers_or_raise(model: nn.Layer, action: str) -> list[tuple[str, QuantedLayer]]:
    if not isinstance(model, nn.Layer):
        raise TypeError(f"{action}: model must be a paddle.nn.Layer, got {type(model).__name__}")
    layers = calibration_layers(model)
    if not layers:
        what = "has quantized layers but none made by PTQ" if next(iter_quanted_layers(model), None) else \
            "has no quantized layer"
        raise ValueError(
            f"{action}: {type(model).__name__} {what}; prepare it with PTQ(...).quantize(model) first"
        )
    return layers


def state_of(layer: QuantedLayer) -> str:
    """``'calibrating'``, ``'paused'`` or ``'frozen'``: the state of one PTQ layer."""
    quanter = layer.act_quanter
    if quanter.quantizing:
        return FROZEN
    return CALIBRATING if quanter.observing else PAUSED


def calibration_state(model: nn.Layer) -> str:
    """``'calibrating'``, ``'paused'`` or ``'frozen'`` (see the module docstring)."""
    states = {state_of(layer) for _, layer in _layers_or_raise(model, "calibration_state")}
    if len(states) != 1:
        raise ValueError(f"calibration_state: the PTQ layers are in mixed states {sorted(states)}")
    return states.pop()


def _set_observing(model: nn.Layer, observing: bool, action: str) -> None:
    layers = _layers_or_raise(model, action)
    if any(state_of(layer) == FROZEN for _, layer in layers):
        raise RuntimeError(f"{action}: the model is already frozen; calibration has ended")
    for _, layer in layers:
        layer.act_quanter.enable_observer(observing)


def pause_calibration(model: nn.Layer) -> None:
    """Stop the calibrators observing (forward passes then leave the statistics alone)."""
    _set_observing(model, False, "pause_calibration")


def resume_calibration(model: nn.Layer) -> None:
    """Let the calibrators observe again after ``pause_calibration``."""
    _set_observing(model, True, "resume_calibration")


def freeze(model: nn.Layer) -> nn.Layer:
    """End calibration of a PTQ model in place and return it.

    Each activation quanter stops observing and fake-quantizes with the threshold its calibrator
    computed (KL, percentile, MSE or abs max); each weight quanter fake-quantizes the weight with
    its abs max (per channel or per tensor). Calling it on a frozen model does nothing.

    Raises:
        ValueError: ``model`` was not prepared by ``PTQ.quantize``.
        RuntimeError: no calibration batch was seen, some layers never received data during
            calibration (they are named), or a threshold is not finite.
    """
    layers = _layers_or_raise(model, "freeze")
    if all(state_of(layer) == FROZEN for _, layer in layers):
        return model
    unobserved = [name for name, layer in layers if not layer.act_quanter.is_ready()]
    if len(unobserved) == len(layers):
        raise RuntimeError(
            "no calibration batch has been seen: run forward passes of calibration data through "
            "the model returned by PTQ.quantize (or use qtrainer.quant.calibrate) before "
            "freezing or saving it"
        )
    if unobserved:
        raise RuntimeError(
            f"layers {unobserved} received no input during calibration, so they have no threshold; "
            "check that the calibration forward passes reach them, or leave them in float with "
            "PTQ(skip_patterns=[...])"
        )
    thresholds = {}
    for name, layer in layers:
        value = float(layer.act_quanter.scale().numpy().reshape(-1)[0])
        if not math.isfinite(value) or value <= 0:
            raise RuntimeError(f"freeze: the calibrated threshold of {name} is {value}")
        thresholds[name] = value
    for _, layer in layers:
        layer.act_quanter.freeze()
        weight = layer.weight_quanter
        if isinstance(weight, Quanter):  # the weight's own abs max again, quantizing
            weight.enable_observer(True).enable_quant(True)
    logger.info("PTQ: froze %d layer(s); activation thresholds %s", len(layers),
                ", ".join(f"{n}={t:.4g}" for n, t in thresholds.items()))
    return model


# ---------------------------------------------------------------------- calibration loop
def _default_forward(model: nn.Layer) -> Callable[[Any, int], Any]:
    def forward(batch: Any, batch_idx: int) -> Any:
        if isinstance(batch, dict):
            return model(**batch)
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        if not isinstance(inputs, paddle.Tensor):
            inputs = paddle.to_tensor(inputs)
        return model(inputs)

    return forward


def calibrate(
    model: nn.Layer,
    loader: Iterable,
    num_batches: int | None = None,
    epochs: int = 1,
    forward: Callable[[Any, int], Any] | None = None,
    progress: bool = False,
) -> int:
    """Run calibration batches through a PTQ model; return how many batches it saw.

    Each of ``epochs`` passes iterates ``loader`` anew and stops after ``num_batches`` batches
    (None = the whole loader). The model runs in eval mode under ``paddle.no_grad()``; the
    calibrators observe during this call even if calibration was paused, and the previous state
    is restored afterwards. ``forward(batch, batch_idx)`` runs one batch (default: ``model`` on
    the first element of a list/tuple batch -- ``(images, labels)`` --, on the keyword arguments
    of a dict batch, or on the batch itself). ``progress`` shows a tqdm bar on stderr.

    Raises:
        ValueError: ``num_batches``/``epochs`` not positive, or the loader yielded no batch.
        RuntimeError: the model is already frozen.
    """
    check_positive_int("num_batches", num_batches, allow_none=True)
    check_positive_int("epochs", epochs)
    if loader is None or not hasattr(loader, "__iter__"):
        raise TypeError(f"calibrate: loader must be an iterable of batches, got {type(loader).__name__}")
    was_paused = calibration_state(model) == PAUSED
    resume_calibration(model)  # raises when frozen
    step = forward or _default_forward(model)
    per_epoch = min(loader_length(loader), num_batches if num_batches is not None else math.inf)
    total = None if math.isinf(per_epoch) else int(per_epoch) * epochs
    from tqdm import tqdm

    seen = 0
    bar = tqdm(total=total, desc="Calibrating", unit="batch", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        with EvalMode(model), paddle.no_grad():
            for _ in range(epochs):
                iterator = guard_iterator(iter(loader))
                try:
                    for batch_idx, batch in enumerate(iterator):
                        if num_batches is not None and batch_idx >= num_batches:
                            break
                        step(batch, batch_idx)
                        seen += 1
                        bar.update(1)
                finally:
                    close_iterator(iterator)
    finally:
        bar.close()
        if was_paused:
            pause_calibration(model)
    if seen == 0:
        raise ValueError(
            f"calibrate: the calibration loader ({type(loader).__name__}) yielded no batch; give it "
            "at least one batch of representative inputs"
        )
    logger.info("PTQ: calibrated on %d batch(es) over %d epoch(s)", seen, epochs)
    return seen
