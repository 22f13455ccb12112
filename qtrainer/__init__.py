"""qtrainer: a Lightning-style Trainer for PaddlePaddle whose callbacks make quantization a one-liner."""
__version__ = "0.1.0"

from qtrainer.callbacks.base import Callback  # noqa: E402
from qtrainer.classification import ClassificationModule  # noqa: E402
from qtrainer.module import Module  # noqa: E402
from qtrainer.trainer import Trainer  # noqa: E402

__all__ = ["Trainer", "Module", "Callback", "ClassificationModule", "__version__"]
