"""qtrainer's quantization engine and its front doors.

Seed-compatible API (PaddleSlim's dygraph quantization, working on Paddle 3.3):
``QAT``, ``PTQ``, ``quant_post_dynamic``. Trainer callbacks: ``QATCallback``, ``PTQCallback``
(re-exported lazily from ``qtrainer.callbacks``: importing the engine does not import them).
The engine underneath, one folder per role: ``observers`` (statistics -> scale), ``quanters``
(fake quant-dequant, PACT), ``transforms`` (layer wrapping, conv+BN folding), ``methods`` (QAT,
PTQ, dynamic), ``export`` (the int8 export), ``diagnostics`` (statistics, PTQ report, rank sync).
"""
from qtrainer.quant.base import Observer, Quanter
from qtrainer.quant.config import SUPPORTED_LAYER_TYPES, QuantConfig
from qtrainer.quant.diagnostics.ptq_report import build_ptq_report
from qtrainer.quant.diagnostics.sensitivity import SensitivityReport, sensitivity
from qtrainer.quant.diagnostics.stats import collect_quant_stats, flatten_for_logging, record_activation_clipping
from qtrainer.quant.export import ExportCheckError, ExportReport, export_quantized_model
from qtrainer.quant.methods.bias_correction import BiasCorrection, correct_bias
from qtrainer.quant.methods.dynamic import quant_post_dynamic, quantize_dygraph_weights
from qtrainer.quant.methods.ptq import PTQ, calibrate, freeze
from qtrainer.quant.methods.ptq_pipeline import calibrate_and_freeze
from qtrainer.quant.methods.qat import QAT
from qtrainer.quant.observers.absmax import (
    AbsmaxCalibrator,
    AbsMaxObserver,
    MovingAverageAbsMaxObserver,
    PerChannelAbsMaxObserver,
)
from qtrainer.quant.observers.calibrators import ACTIVATION_CALIBRATORS, make_activation_calibrator
from qtrainer.quant.observers.histogram import HistCalibrator, KLCalibrator, MSECalibrator
from qtrainer.quant.quanters.fake_quant import FakeQuanter, fake_quant
from qtrainer.quant.quanters.fused import FusedAbsMaxQuanter
from qtrainer.quant.quanters.pact import PACT, PACTQuanter
from qtrainer.quant.transforms.bn_freeze import freeze_batch_norm_stats
from qtrainer.quant.transforms.fuse import find_conv_bn_pairs, fuse_conv_bn
from qtrainer.quant.transforms.wrap import (
    QuantedConv2D,
    QuantedLayer,
    QuantedLinear,
    computing_float,
    iter_quanted_layers,
    quant_sync_modes,
    quantize_model,
)

__all__ = [
    "QAT", "QATCallback", "PTQ", "PTQCallback", "calibrate", "freeze", "calibrate_and_freeze", "build_ptq_report",
    "correct_bias", "BiasCorrection", "computing_float", "sensitivity", "SensitivityReport",
    "freeze_batch_norm_stats",
    "quant_post_dynamic", "quantize_dygraph_weights",
    "export_quantized_model", "ExportReport", "ExportCheckError",
    "QuantConfig", "SUPPORTED_LAYER_TYPES", "quantize_model", "iter_quanted_layers", "quant_sync_modes",
    "QuantedLayer", "QuantedConv2D", "QuantedLinear", "FakeQuanter", "FusedAbsMaxQuanter", "fake_quant",
    "Observer", "Quanter",
    "AbsMaxObserver", "MovingAverageAbsMaxObserver", "PerChannelAbsMaxObserver", "PACT", "PACTQuanter",
    "ACTIVATION_CALIBRATORS", "AbsmaxCalibrator", "HistCalibrator", "KLCalibrator", "MSECalibrator",
    "make_activation_calibrator", "fuse_conv_bn", "find_conv_bn_pairs",
    "collect_quant_stats", "flatten_for_logging", "record_activation_clipping",
]

_CALLBACKS = {"QATCallback": "qtrainer.callbacks.qat", "PTQCallback": "qtrainer.callbacks.ptq"}


def __getattr__(name: str):
    """``QATCallback`` / ``PTQCallback``, imported from the callback layer on first use."""
    if name in _CALLBACKS:
        import importlib

        return getattr(importlib.import_module(_CALLBACKS[name]), name)
    raise AttributeError(f"module 'qtrainer.quant' has no attribute {name!r}")
