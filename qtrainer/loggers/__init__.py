"""Experiment loggers: the ``Logger`` base class, TensorBoard and CSV."""
from qtrainer.loggers.base import Logger
from qtrainer.loggers.csv_logger import CSVLogger
from qtrainer.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger"]
