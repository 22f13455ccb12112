"""The PTQ activation calibrators by their seed (PaddleSlim) names, and how to make one."""
from __future__ import annotations

import inspect

from qtrainer.quant.base import Observer
from qtrainer.quant.observers.absmax import AbsmaxCalibrator
from qtrainer.quant.observers.histogram import HistCalibrator, KLCalibrator, MSECalibrator

__all__ = ["ACTIVATION_CALIBRATORS", "calibrator_kwargs", "make_activation_calibrator", "seed_name"]

#: Seed (PaddleSlim) activation quantizer names -> calibrator classes.
ACTIVATION_CALIBRATORS: dict[str, type[Observer]] = {
    "KLQuantizer": KLCalibrator,
    "HistQuantizer": HistCalibrator,
    "AbsmaxQuantizer": AbsmaxCalibrator,
    "MSEQuantizer": MSECalibrator,
}
_SEED_NAME = {cls: name for name, cls in ACTIVATION_CALIBRATORS.items()}


def calibrator_kwargs(cls: type[Observer]) -> list[str]:
    """Names of the keyword arguments a calibrator class accepts."""
    params = inspect.signature(cls.__init__).parameters
    return [name for name in params if name != "self"]


def make_activation_calibrator(name: str, **kwargs: object) -> Observer:
    """A new calibrator for the seed quantizer ``name`` (a key of ``ACTIVATION_CALIBRATORS``).

    Raises ``ValueError`` for an unknown name and ``TypeError`` for a keyword argument the chosen
    calibrator does not take; bad values raise ``ValueError`` from the calibrator.
    """
    if name not in ACTIVATION_CALIBRATORS:
        raise ValueError(
            f"unknown activation quantizer {name!r}: use one of {sorted(ACTIVATION_CALIBRATORS)}"
        )
    cls = ACTIVATION_CALIBRATORS[name]
    accepted = calibrator_kwargs(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"activation quantizer {name!r} does not take {', '.join(map(repr, unknown))}: "
            f"it accepts {accepted}"
        )
    return cls(**kwargs)


def seed_name(calibrator: Observer) -> str:
    """The seed quantizer name of a calibrator (e.g. ``'KLQuantizer'``), else its class name."""
    return _SEED_NAME.get(type(calibrator), type(calibrator).__name__)
