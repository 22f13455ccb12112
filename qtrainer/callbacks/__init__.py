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
    "TQDMProgressBar",
]
