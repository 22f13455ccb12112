"""qtrainer's quantization engine and its front doors.

Seed-compatible API (PaddleSlim's dygraph quantization, working on Paddle 3.3):
``QAT``, ``PTQ``, ``quant_post_dynamic``. Trainer callbacks: ``QATCallback``, ``PTQCallback``.
The engine underneath: observers and calibrators (statistics → scale), quanters (fake
quant-dequant), PACT, layer wrapping, conv+BN folding and the int8 export.
"""
from qtrainer.quant.base import Observer, Quanter
from qtrainer.quant.calibrators import (
    ACTIVATION_CALIBRATORS,
    AbsmaxCalibrator,
    HistCalibrator,
    KLCalibrator,
    MSECalibrator,
    make_activation_calibrator,
)
from qtrainer.quant.config import SUPPORTED_LAYER_TYPES, QuantConfig
from qtrainer.quant.export import ExportCheckError, ExportReport, export_quantized_model
from qtrainer.quant.dynamic import quant_post_dynamic, quantize_dygraph_weights
from qtrainer.quant.fuse import find_conv_bn_pairs, fuse_conv_bn
from qtrainer.quant.observers import AbsMaxObserver, MovingAverageAbsMaxObserver, PerChannelAbsMaxObserver
from qtrainer.quant.pact import PACT, PACTQuanter
from qtrainer.quant.qat import QAT
from qtrainer.quant.ptq import PTQ, calibrate, freeze
from qtrainer.quant.ptq_callback import PTQCallback
from qtrainer.quant.ptq_report import build_ptq_report
from qtrainer.quant.qat_callback import QATCallback
from qtrainer.quant.quanters import FakeQuanter, fake_quant
from qtrainer.quant.stats import collect_quant_stats, flatten_for_logging, record_activation_clipping
from qtrainer.quant.wrap import (
    QuantedConv2D,
    QuantedLayer,
    QuantedLinear,
    iter_quanted_layers,
    quant_sync_modes,
    quantize_model,
)

__all__ = [
    "QAT", "QATCallback", "PTQ", "PTQCallback", "calibrate", "freeze", "build_ptq_report", "quant_post_dynamic", "quantize_dygraph_weights",
    "export_quantized_model", "ExportReport", "ExportCheckError",
    "QuantConfig", "SUPPORTED_LAYER_TYPES", "quantize_model", "iter_quanted_layers", "quant_sync_modes",
    "QuantedLayer", "QuantedConv2D", "QuantedLinear", "FakeQuanter", "fake_quant", "Observer", "Quanter",
    "AbsMaxObserver", "MovingAverageAbsMaxObserver", "PerChannelAbsMaxObserver", "PACT", "PACTQuanter",
    "ACTIVATION_CALIBRATORS", "AbsmaxCalibrator", "HistCalibrator", "KLCalibrator", "MSECalibrator",
    "make_activation_calibrator", "fuse_conv_bn", "find_conv_bn_pairs",
    "collect_quant_stats", "flatten_for_logging", "record_activation_clipping",
]
