"""Callbacks: the hook base class, the monitored-metric base, and the standard callbacks."""
from qtrainer.callbacks.base import Callback
from qtrainer.callbacks.early_stopping import EarlyStopping
from qtrainer.callbacks.lr_monitor import LearningRateMonitor
from qtrainer.callbacks.model_checkpoint import ModelCheckpoint
from qtrainer.callbacks.monitor import MonitorCallback
from qtrainer.callbacks.progress import TQDMProgressBar

__all__ = [
    "Callback",
    "EarlyStopping",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "MonitorCallback",
    "PTQCallback",
    "QATCallback",
    "TQDMProgressBar",
]

# The quantization callbacks import the engine (qtrainer.quant): loaded on first use, so that the
# Trainer, which imports this package, never imports qtrainer.quant.
_QUANT_CALLBACKS = {"QATCallback": "qtrainer.callbacks.qat", "PTQCallback": "qtrainer.callbacks.ptq"}


def __getattr__(name: str):
    if name in _QUANT_CALLBACKS:
        import importlib

        return getattr(importlib.import_module(_QUANT_CALLBACKS[name]), name)
    raise AttributeError(f"module 'qtrainer.callbacks' has no attribute {name!r}")
