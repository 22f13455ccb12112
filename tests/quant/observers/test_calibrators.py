"""Tests of qtrainer/quant/observers/calibrators.py: the seed-name registry."""
from __future__ import annotations

import pytest

from qtrainer.quant.observers.calibrators import ACTIVATION_CALIBRATORS, make_activation_calibrator


def test_registry_builds_each_seed_quantizer():
    assert set(ACTIVATION_CALIBRATORS) == {"KLQuantizer", "HistQuantizer", "AbsmaxQuantizer", "MSEQuantizer"}
    for name, cls in ACTIVATION_CALIBRATORS.items():
        assert type(make_activation_calibrator(name)) is cls
    h = make_activation_calibrator("HistQuantizer", upsample_bins=127, hist_percent=0.999)
    assert (h.bins, h.upsample_bins, h.hist_percent) == (1024, 127, 0.999)


def test_registry_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError, match="'KLQuantiser'.*AbsmaxQuantizer.*HistQuantizer.*KLQuantizer"):
        make_activation_calibrator("KLQuantiser")


@pytest.mark.parametrize("name, kwargs, bad", [
    ("KLQuantizer", {"hist_percent": 0.9}, "hist_percent"),
    ("AbsmaxQuantizer", {"bins": 512}, "bins"),
    ("MSEQuantizer", {"moving_rate": 0.9}, "moving_rate"),
])
def test_registry_rejects_kwargs_the_calibrator_does_not_take(name, kwargs, bad):
    with pytest.raises(TypeError, match=f"{name}.*'{bad}'.*accepts.*quant_bits"):
        make_activation_calibrator(name, **kwargs)


def test_registry_passes_bad_values_to_validation():
    with pytest.raises(ValueError, match="upsample_bins=-1"):
        make_activation_calibrator("KLQuantizer", upsample_bins=-1)
