"""qtrainer: a Lightning-style Trainer for PaddlePaddle whose callbacks make quantization a one-liner."""
from qtrainer._version import __version__
from qtrainer.callbacks.base import Callback
from qtrainer.classification import ClassificationModule
from qtrainer.module import Module
from qtrainer.trainer import Trainer

__all__ = ["Trainer", "Module", "Callback", "ClassificationModule", "__version__"]
