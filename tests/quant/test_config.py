"""QuantConfig: the seed's keys and defaults, the extras, and the errors for bad input."""
from __future__ import annotations

import re

import pytest

from qtrainer.quant.config import SUPPORTED_LAYER_TYPES, QuantConfig

SEED_DEFAULTS = {
    "weight_preprocess_type": None,
    "activation_preprocess_type": None,
    "weight_quantize_type": "channel_wise_abs_max",
    "activation_quantize_type": "moving_average_abs_max",
    "weight_bits": 8,
    "activation_bits": 8,
    "moving_rate": 0.9,
    "quantizable_layer_type": ["Conv2D", "Linear"],
}


def test_defaults_are_the_seeds():
    cfg = QuantConfig.from_dict(None)
    for key, value in SEED_DEFAULTS.items():
        assert getattr(cfg, key) == value, key
    assert cfg.skip_patterns == []


def test_every_seed_value_is_accepted():
    cfg = QuantConfig.from_dict(
        {
            "weight_preprocess_type": "PACT",
            "activation_preprocess_type": "PACT",
            "weight_quantize_type": "abs_max",
            "activation_quantize_type": "abs_max",
            "weight_bits": 4,
            "activation_bits": 16,
            "moving_rate": 0.5,
            "quantizable_layer_type": ["Linear"],
        }
    )
    assert cfg.weight_quantize_type == "abs_max" and cfg.activation_bits == 16
    assert cfg.quantizable_layer_type == ["Linear"]


def test_from_dict_does_not_change_the_callers_dict():
    d = {"weight_bits": 4, "quantizable_layer_type": ["Conv2D"]}
    QuantConfig.from_dict(d)
    assert d == {"weight_bits": 4, "quantizable_layer_type": ["Conv2D"]}


def test_to_dict_round_trips():
    cfg = QuantConfig.from_dict({"skip_patterns": ["*.fc", re.compile(r"head\..*")], "pact_init": 6})
    again = QuantConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert cfg.to_dict()["skip_patterns"] == ["*.fc", r"re:head\..*"]


def test_unknown_key_lists_valid_keys_and_suggests_the_closest():
    with pytest.raises(ValueError) as err:
        QuantConfig.from_dict({"weight_bit": 8}, source="QAT config")
    msg = str(err.value)
    assert "'weight_bit'" in msg and "QAT config" in msg
    assert "Did you mean 'weight_bits'?" in msg
    for key in SEED_DEFAULTS:
        assert key in msg


@pytest.mark.parametrize(
    "key, bad, accepted",
    [
        ("weight_preprocess_type", "pact", "'PACT'"),
        ("activation_preprocess_type", "LSQ", "None"),
        ("weight_quantize_type", "range_abs_max", "'channel_wise_abs_max'"),
        ("activation_quantize_type", "channel_wise_abs_max", "'moving_average_abs_max'"),
    ],
)
def test_bad_choice_lists_accepted_values(key, bad, accepted):
    with pytest.raises(ValueError) as err:
        QuantConfig.from_dict({key: bad})
    msg = str(err.value)
    assert key in msg and repr(bad) in msg and accepted in msg


@pytest.mark.parametrize("key", ["weight_bits", "activation_bits"])
@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, True, "8"])
def test_bits_out_of_range(key, bits):
    with pytest.raises(ValueError, match=key):
        QuantConfig.from_dict({key: bits})


@pytest.mark.parametrize("bits", [2, 16])
def test_bits_at_the_limits(bits):
    assert QuantConfig.from_dict({"weight_bits": bits}).weight_bits == bits


def test_deployable_bits_are_at_most_eight():
    QuantConfig(weight_bits=8, activation_bits=2).require_deployable_bits()
    with pytest.raises(ValueError, match=r"activation_bits=9 in my config: .*none above 8 bits.*from 2 to 8"):
        QuantConfig(activation_bits=9).require_deployable_bits("my config")


def test_an_exporting_qat_callback_refuses_more_than_eight_bits_before_training():
    from qtrainer.callbacks.qat import QATCallback

    with pytest.raises(ValueError, match=r"weight_bits=16 in QATCallback config"):
        QATCallback({"weight_bits": 16})
    assert QATCallback({"weight_bits": 16}, export_dir=False).config.weight_bits == 16  # simulation only


@pytest.mark.parametrize("rate", [0, 1, 0.0, 1.0, -0.1, 1.5, "0.9", None, True])
def test_moving_rate_outside_open_interval(rate):
    with pytest.raises(ValueError, match="moving_rate"):
        QuantConfig.from_dict({"moving_rate": rate})


def test_conv2d_transpose_is_rejected_with_the_reason_and_the_supported_types():
    with pytest.raises(ValueError) as err:
        QuantConfig.from_dict({"quantizable_layer_type": ["Conv2D", "Conv2DTranspose"]})
    msg = str(err.value)
    assert "Conv2DTranspose" in msg and "not supported" in msg
    assert all(t in msg for t in SUPPORTED_LAYER_TYPES)


def test_misspelt_layer_type_gets_a_suggestion():
    with pytest.raises(ValueError, match="Did you mean 'Linear'"):
        QuantConfig.from_dict({"quantizable_layer_type": ["Linaer"]})


@pytest.mark.parametrize("bad", ["Conv2D", [], None, ("Conv2D", 3)])
def test_layer_type_must_be_a_non_empty_list_of_names(bad):
    with pytest.raises(ValueError, match="quantizable_layer_type"):
        QuantConfig.from_dict({"quantizable_layer_type": bad})


def test_duplicate_layer_types_are_collapsed():
    cfg = QuantConfig.from_dict({"quantizable_layer_type": ["Linear", "Linear"]})
    assert cfg.quantizable_layer_type == ["Linear"]


def test_skip_patterns_fnmatch_regex_and_compiled():
    cfg = QuantConfig.from_dict(
        {"skip_patterns": ["features.0*", r"re:head\.(fc|proj)", re.compile(r".*\.dw")]}
    )
    m = cfg.skip_matcher()
    assert m.matches("features.0.conv")
    assert m.matches("head.fc") and m.matches("head.proj")
    assert not m.matches("head.fc2")  # the regex must match the whole name
    assert m.matches("block.1.dw")
    assert not m.matches("features.1.conv")
    assert m.unused() == []


def test_unused_skip_patterns_are_reported():
    m = QuantConfig.from_dict({"skip_patterns": ["nothing*", "a"]}).skip_matcher()
    m.matches("a")
    assert m.unused() == ["nothing*"]


@pytest.mark.parametrize("bad", ["re:(unclosed", 3, ["ok", None]])
def test_bad_skip_patterns(bad):
    with pytest.raises(ValueError, match="skip_patterns"):
        QuantConfig.from_dict({"skip_patterns": bad if isinstance(bad, list) else [bad]})


def test_a_single_skip_pattern_string_is_a_list_of_one():
    assert QuantConfig.from_dict({"skip_patterns": "fc"}).skip_patterns == ["fc"]


@pytest.mark.parametrize(
    "key, bad",
    [
        ("pact_init", 0),
        ("pact_init", -1.0),
        ("pact_init", "auto"),
        ("pact_warmup_steps", -1),
        ("pact_warmup_steps", 1.5),
        ("pact_lr_mult", 0),
        ("pact_decay", -1e-4),
    ],
)
def test_bad_pact_settings(key, bad):
    with pytest.raises(ValueError, match=key):
        QuantConfig.from_dict({key: bad})


def test_paddleslim_only_keys_are_accepted_when_valid():
    cfg = QuantConfig.from_dict(
        {"dtype": "int8", "window_size": 10000, "for_tensorrt": False, "onnx_format": True}
    )
    assert cfg == QuantConfig()


@pytest.mark.parametrize("key, bad", [("dtype", "int4"), ("window_size", 0), ("onnx_format", "yes")])
def test_paddleslim_only_keys_with_bad_values(key, bad):
    with pytest.raises(ValueError, match=key):
        QuantConfig.from_dict({key: bad})


def test_config_must_be_a_dict():
    with pytest.raises(TypeError, match="dict"):
        QuantConfig.from_dict([("weight_bits", 8)])
