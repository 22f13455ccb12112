"""``QuantConfig``: the QAT configuration, with the seed's keys and defaults plus a few extras.

Seed keys (PaddleSlim's dygraph ``QAT`` config, same defaults):

==============================  ============================  ==============================================
key                             default                       accepted
==============================  ============================  ==============================================
``weight_preprocess_type``      ``None``                      ``None``, ``'PACT'``
``activation_preprocess_type``  ``None``                      ``None``, ``'PACT'``
``weight_quantize_type``        ``'channel_wise_abs_max'``    ``'channel_wise_abs_max'``, ``'abs_max'``
``activation_quantize_type``    ``'moving_average_abs_max'``  ``'moving_average_abs_max'``, ``'abs_max'``
``weight_bits``                 ``8``                         integer 2..8 (``QAT``); 2..16 (engine)
``activation_bits``             ``8``                         integer 2..8 (``QAT``); 2..16 (engine)
``moving_rate``                 ``0.9``                       float in (0, 1)
``quantizable_layer_type``      ``['Conv2D', 'Linear']``      non-empty subset of the supported types
==============================  ============================  ==============================================

Bits above 8: Paddle Inference has no CPU kernels above 8 bits, so the export keeps such a layer
in float. ``QAT``, ``PTQ`` and ``QATCallback`` (when it exports) refuse them when they are built
(``require_deployable_bits``), not after training; the engine (``quantize_model``) accepts up to 16
for simulation-only studies and for mixed-precision models whose >8-bit layers stay float.

Weights with fewer than 8 bits are simulated on the levels Paddle's int8 kernels deploy them with:
a 4-bit weight takes 15 values per channel, ``round(k * 127 / 7) * T / 127`` for k in -7..7, each
within half an int8 step of the uniform 4-bit level ``k * T / 7`` (``qtrainer.quant.quanters``).

Quantizable layer types: ``'Conv2D'`` (plain, grouped and depthwise; weight ``[out, in/groups, kh,
kw]``, channel axis 0) and ``'Linear'`` (weight ``[in, out]``, channel axis 1). Those are the layers
Paddle Inference's CPU int8 pass quantizes (``conv2d``/``depthwise_conv2d`` and ``fc``/``matmul``).
``'Conv2DTranspose'`` is rejected: its weight is ``[in, out/groups, kh, kw]``, so with groups the
output channels are not one axis, and that pass does not quantize ``conv2d_transpose``.

Extras (not in the seed):

* ``skip_patterns`` (list, default empty): layers *not* to quantize, matched against the names of
  ``model.named_sublayers()`` (e.g. ``'features.0.conv'``). A pattern that matches a container
  skips everything under it. Strings are shell-style ``fnmatch`` patterns over the whole name
  (``'*.fc'``, ``'features.0*'``); a string starting with ``'re:'`` or a compiled ``re.Pattern``
  is a regular expression that must match the whole name (``'re:head\\.(fc|proj)'``). Independently,
  a layer (or any layer above it) with the attribute ``skip_quant = True`` is skipped.
* PACT settings (see ``qtrainer.quant.quanters.pact``): ``pact_init`` (``None`` = start ``alpha`` from the
  data's moving-average abs max; or a positive float), ``pact_warmup_steps`` (``100``: how many
  training forwards ``alpha`` follows the data when ``pact_init`` is ``None``), ``pact_lr_mult``
  (``1.0``: learning-rate multiplier of ``alpha``), ``pact_decay`` (``None`` = the optimizer's weight
  decay, or an L2 coefficient for ``alpha`` alone). Weight PACT always starts at the weight's abs
  max.

* ``quantize_residual_inputs`` (``True``): in a residual block ``branch(x) + x`` whose ``x`` is
  also a quantized convolution's input, the add reads ``x`` quantized with that convolution's
  scale, as the fused int8 graph computes it, so the export fuses the add into the convolution
  (``qtrainer.quant.transforms.residual``). ``False`` adds the float ``x`` and the export keeps
  such adds in float (slower).

Accepted for compatibility with PaddleSlim configs and ignored with a log message: ``dtype``
(``'int8'``), ``window_size`` (PaddleSlim's ``range_abs_max`` window, unused here), ``for_tensorrt``
and ``onnx_format`` (qtrainer's export format is fixed).
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from qtrainer.quant.base import check_bits

__all__ = ["QuantConfig", "SUPPORTED_LAYER_TYPES", "DEPLOYABLE_MAX_BITS"]

logger = logging.getLogger(__name__)

SUPPORTED_LAYER_TYPES = ("Conv2D", "Linear")
#: The most bits the int8 deployment runs (Paddle Inference has no CPU kernels above 8 bits).
DEPLOYABLE_MAX_BITS = 8
PREPROCESS_TYPES = (None, "PACT")
WEIGHT_QUANTIZE_TYPES = ("channel_wise_abs_max", "abs_max")
ACTIVATION_QUANTIZE_TYPES = ("moving_average_abs_max", "abs_max")
_IGNORED_COMPAT_KEYS = {
    "dtype": ("int8",),
    "window_size": None,  # any positive int
    "for_tensorrt": (False, True),
    "onnx_format": (False, True),
}
_WHY_UNSUPPORTED = {
    "Conv2DTranspose": "its output channels are not one weight axis when grouped, and Paddle "
    "Inference's int8 pass does not quantize conv2d_transpose",
}


def _default_layer_types() -> list[str]:
    return list(SUPPORTED_LAYER_TYPES)


@dataclass
class QuantConfig:
    """Validated QAT configuration; see the module docstring for every key."""

    weight_preprocess_type: str | None = None
    activation_preprocess_type: str | None = None
    weight_quantize_type: str = "channel_wise_abs_max"
    activation_quantize_type: str = "moving_average_abs_max"
    weight_bits: int = 8
    activation_bits: int = 8
    moving_rate: float = 0.9
    quantizable_layer_type: list[str] = field(default_factory=_default_layer_types)
    skip_patterns: list[Any] = field(default_factory=list)
    pact_init: float | None = None
    pact_warmup_steps: int = 100
    pact_lr_mult: float = 1.0
    pact_decay: float | None = None
    quantize_residual_inputs: bool = True

    def __post_init__(self) -> None:
        self._source = getattr(self, "_source", "QuantConfig")
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(
        cls, config: Mapping[str, Any] | "QuantConfig" | None, source: str = "config"
    ) -> "QuantConfig":
        """Build from a dict (``None`` = all defaults); unknown keys and bad values raise."""
        if config is None:
            return cls()
        if isinstance(config, QuantConfig):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(
                f"{source} must be a dict of QAT settings or None, got {type(config).__name__}"
            )
        valid = cls.valid_keys()
        kwargs = {}
        for key, value in config.items():
            if key in _IGNORED_COMPAT_KEYS:
                _check_compat_key(key, value, source)
                continue
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid + list(_IGNORED_COMPAT_KEYS), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown key {key!r} in {source}.{hint} Valid keys: {', '.join(valid)}"
                )
            kwargs[key] = value
        obj = cls.__new__(cls)
        obj._source = source
        obj.__init__(**kwargs)
        return obj

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (regex patterns as their ``'re:'`` strings)."""
        out = dataclasses.asdict(self)
        out["skip_patterns"] = [
            f"re:{p.pattern}" if isinstance(p, re.Pattern) else p for p in self.skip_patterns
        ]
        return out

    # ------------------------------------------------------------------ queries
    def require_deployable_bits(self, source: str | None = None) -> None:
        """Raise ``ValueError`` if ``weight_bits`` or ``activation_bits`` exceed what the export runs.

        For the front doors whose result is deployed (``QAT``, ``PTQ``, an exporting
        ``QATCallback``): with more than 8 bits every layer would be exported in float and the
        export would refuse -- after the training. ``source`` names where the config came from.
        """
        src = source or self._source
        for key in ("weight_bits", "activation_bits"):
            bits = getattr(self, key)
            if bits > DEPLOYABLE_MAX_BITS:
                raise ValueError(
                    f"{key}={bits} in {src}: the int8 export (save_quantized_model) runs on Paddle "
                    f"Inference's CPU kernels, which have none above {DEPLOYABLE_MAX_BITS} bits, so "
                    f"every {bits}-bit layer would be deployed in float and the export would have "
                    f"nothing to run in int8. Accepted: an integer from 2 to {DEPLOYABLE_MAX_BITS} "
                    "(below 8 bits is simulated on the int8 levels). To simulate more bits without "
                    "deploying them, use qtrainer.quant.quantize_model(model, config)."
                )

    def skip_matcher(self) -> "_SkipMatcher":
        """An object whose ``matches(name)`` says whether ``skip_patterns`` skip that layer name."""
        return _SkipMatcher(self.skip_patterns)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        src = self._source
        _check_choice("weight_preprocess_type", self.weight_preprocess_type, PREPROCESS_TYPES, src)
        _check_choice(
            "activation_preprocess_type", self.activation_preprocess_type, PREPROCESS_TYPES, src
        )
        _check_choice(
            "weight_quantize_type", self.weight_quantize_type, WEIGHT_QUANTIZE_TYPES, src
        )
        _check_choice(
            "activation_quantize_type", self.activation_quantize_type, ACTIVATION_QUANTIZE_TYPES, src
        )
        check_bits(self.weight_bits, f"weight_bits (in {src})")
        check_bits(self.activation_bits, f"activation_bits (in {src})")
        rate = self.moving_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
            raise ValueError(
                f"moving_rate={rate!r} in {src} must be a float strictly between 0 and 1 "
                "(0.9 is the default)"
            )
        self.moving_rate = float(rate)
        self.quantizable_layer_type = _check_layer_types(self.quantizable_layer_type, src)
        self.skip_patterns = _check_skip_patterns(self.skip_patterns, src)
        if self.pact_init is not None:
            if isinstance(self.pact_init, bool) or not isinstance(self.pact_init, (int, float)) or (
                not self.pact_init > 0
            ):
                raise ValueError(
                    f"pact_init={self.pact_init!r} in {src} must be None (start from the data) "
                    "or a positive number"
                )
            self.pact_init = float(self.pact_init)
        steps = self.pact_warmup_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"pact_warmup_steps={steps!r} in {src} must be an integer >= 0")
        lr = self.pact_lr_mult
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"pact_lr_mult={lr!r} in {src} must be a positive number")
        self.pact_lr_mult = float(lr)
        decay = self.pact_decay
        if decay is not None:
            if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
                raise ValueError(
                    f"pact_decay={decay!r} in {src} must be None (use the optimizer's weight "
                    "decay) or a number >= 0"
                )
            self.pact_decay = float(decay)
        if not isinstance(self.quantize_residual_inputs, bool):
            raise ValueError(
                f"quantize_residual_inputs={self.quantize_residual_inputs!r} in {src} must be True "
                "or False"
            )


def _check_choice(key: str, value: Any, accepted: tuple, source: str) -> None:
    if value not in accepted or isinstance(value, bool):
        raise ValueError(
            f"{key}={value!r} in {source} is not valid; accepted values: "
            f"{', '.join(repr(a) for a in accepted)}"
        )


def _check_compat_key(key: str, value: Any, source: str) -> None:
    accepted = _IGNORED_COMPAT_KEYS[key]
    if accepted is None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        accepted_text = "a positive integer"
    else:
        ok = any(value is a or (isinstance(a, str) and value == a) for a in accepted)
        accepted_text = ", ".join(repr(a) for a in accepted)
    if not ok:
        raise ValueError(f"{key}={value!r} in {source} is not valid; accepted values: {accepted_text}")
    logger.info("%s: PaddleSlim key %r=%r is accepted and has no effect in qtrainer", source, key, value)


def _check_layer_types(types: Any, source: str) -> list[str]:
    if isinstance(types, str) or not isinstance(types, (list, tuple)) or not types:
        raise ValueError(
            f"quantizable_layer_type={types!r} in {source} must be a non-empty list of layer "
            f"type names from: {', '.join(SUPPORTED_LAYER_TYPES)}"
        )
    out = []
    for name in types:
        if name not in SUPPORTED_LAYER_TYPES:
            why = _WHY_UNSUPPORTED.get(name)
            reason = f" ({name} is not supported: {why})" if why else ""
            close = difflib.get_close_matches(str(name), SUPPORTED_LAYER_TYPES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close and not why else ""
            raise ValueError(
                f"quantizable_layer_type contains {name!r} in {source}{reason}.{hint} "
                f"Supported layer types: {', '.join(SUPPORTED_LAYER_TYPES)}"
            )
        if name not in out:
            out.append(name)
    return out


def _check_skip_patterns(patterns: Any, source: str) -> list[Any]:
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)):
        raise ValueError(
            f"skip_patterns={patterns!r} in {source} must be a list of fnmatch patterns, "
            "'re:'-prefixed regular expressions or compiled re.Pattern objects"
        )
    out = []
    for pattern in patterns:
        if isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(
                    f"skip_patterns entry {pattern!r} in {source} is not a valid regular "
                    f"expression: {err}"
                ) from None
        elif not isinstance(pattern, (str, re.Pattern)):
            raise ValueError(
                f"skip_patterns entry {pattern!r} in {source} must be a string or re.Pattern, "
                f"not {type(pattern).__name__}"
            )
        out.append(pattern)
    return out


class _SkipMatcher:
    """Matches layer names against ``skip_patterns`` and remembers which patterns were used."""

    def __init__(self, patterns: list[Any]) -> None:
        self.patterns = list(patterns)
        self._compiled = []
        for p in self.patterns:
            if isinstance(p, re.Pattern):
                self._compiled.append(p)
            elif p.startswith("re:"):
                self._compiled.append(re.compile(p[3:]))
            else:
                self._compiled.append(p)
        self.used: set[int] = set()

    def matches(self, name: str) -> bool:
        hit = False
        for i, p in enumerate(self._compiled):
            ok = p.fullmatch(name) is not None if isinstance(p, re.Pattern) else (
                fnmatch.fnmatchcase(name, p)
            )
            if ok:
                self.used.add(i)
                hit = True
        return hit

    def unused(self) -> list[Any]:
        return [p for i, p in enumerate(self.patterns) if i not in self.used]
