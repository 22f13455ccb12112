"""``QAT``: the seed-compatible front door to quantization-aware training.

Usage (the seed's example, with qtrainer's import)::

    from qtrainer.quant import QAT
    quanter = QAT(config={'activation_preprocess_type': 'PACT'})
    quanter.quantize(net)          # in place; create the optimizer afterwards
    ...train net...
    quanter.save_quantized_model(net, './quant_model', input_spec=[...])

User classes (the four optional arguments). Each must be a ``paddle.nn.Layer`` subclass (the
class, not an instance); one instance is created per quantized layer:

* ``weight_preprocess`` / ``act_preprocess``: constructed with no arguments. ``forward(x)`` maps
  the weight (resp. the layer input) to a tensor of the same shape, applied before quantization.
  It may own parameters (they are trained) and buffers (they are checkpointed). It replaces the
  config's ``*_preprocess_type``.
* ``weight_quantize`` / ``act_quantize``: replace the default quanter. The constructor receives
  the keyword arguments ``quant_bits`` (the config's ``weight_bits`` / ``activation_bits``) and
  ``axis`` (the weight's channel axis -- 0 for Conv2D, 1 for Linear -- when
  ``weight_quantize_type`` is channel-wise, else ``None``; always ``None`` for activations), each
  only if ``__init__`` accepts it (by name or ``**kwargs``). ``forward(x)`` receives the weight
  after ``weight_preprocess`` (every forward) or the layer input after ``act_preprocess`` and
  returns the fake-quantized (quantized then dequantized, float) tensor. For export the instance
  must also have ``scale()`` returning the clipping threshold ``T`` as a Tensor (shape ``[1]``, or
  ``[channels]`` for a channel-wise weight quanter, with ``x_q = round(x / T * qmax) * T / qmax``,
  ``qmax = 2**(bits-1) - 1``); without it the export refuses with an error naming the layer.
  Optional attributes ``quant_bits`` and ``axis`` declare a format other than the config's.

See ``examples/custom_quanter.py``.
"""
from __future__ import annotations

import logging
from typing import Any

from paddle import nn

from qtrainer.quant.config import QuantConfig
from qtrainer.quant.export.orchestration import export_quantized_model
from qtrainer.quant.transforms.wrap import check_user_class, iter_quanted_layers, quantize_model

__all__ = ["QAT"]

logger = logging.getLogger(__name__)


class QAT:
    """Quantization-aware training, with PaddleSlim's ``QAT`` signature.

    Args:
        config: dict of settings (see ``qtrainer.quant.config``; ``None`` = defaults) or a
            ``QuantConfig``. Unknown keys and bad values raise ``ValueError``, and so do
            ``weight_bits`` / ``activation_bits`` above 8: ``save_quantized_model`` deploys on
            int8 CPU kernels (``qtrainer.quant.quantize_model`` simulates up to 16 bits).
        weight_preprocess, act_preprocess, weight_quantize, act_quantize: optional user
            classes, see the module docstring.
    """

    def __init__(
        self,
        config: dict[str, Any] | QuantConfig | None = None,
        weight_preprocess: type | None = None,
        act_preprocess: type | None = None,
        weight_quantize: type | None = None,
        act_quantize: type | None = None,
    ) -> None:
        self.config = QuantConfig.from_dict(config, source="QAT config")
        self.config.require_deployable_bits("QAT config")
        check_user_class(weight_preprocess, "weight_preprocess")
        check_user_class(act_preprocess, "act_preprocess")
        check_user_class(weight_quantize, "weight_quantize")
        check_user_class(act_quantize, "act_quantize")
        self.weight_preprocess = weight_preprocess
        self.act_preprocess = act_preprocess
        self.weight_quantize = weight_quantize
        self.act_quantize = act_quantize

    def quantize(self, model: nn.Layer) -> nn.Layer:
        """Insert fake quant-dequant around the model's quantizable layers, in place.

        Returns ``model``. Call it before creating the optimizer so that new parameters (PACT
        ``alpha``) are trained. Raises ``ValueError`` if the model is already quantized or has no
        quantizable layer.
        """
        quantize_model(
            model,
            self.config,
            weight_preprocess=self.weight_preprocess,
            act_preprocess=self.act_preprocess,
            weight_quantize=self.weight_quantize,
            act_quantize=self.act_quantize,
        )
        return model

    def save_quantized_model(
        self, model: nn.Layer, path: str, input_spec: list | None = None, **kwargs: Any
    ) -> Any:
        """Export the quantized ``model`` for Paddle Inference (see ``qtrainer.quant.export_quantized_model``)."""
        if not isinstance(model, nn.Layer):
            raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
        if next(iter_quanted_layers(model), None) is None:
            raise ValueError(
                f"save_quantized_model: {type(model).__name__} has no quantized layer; call "
                "QAT.quantize(model) (and train it) before exporting"
            )
        return export_quantized_model(model, path, input_spec=input_spec, **kwargs)
