"""QAT: the seed's front door (signature, config, quantize, save_quantized_model's checks)."""
from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant.config import QuantConfig
from qtrainer.quant.export.inference import load_int8_predictor
from qtrainer.quant.methods.qat import QAT
from qtrainer.quant.transforms.wrap import QuantedConv2D, iter_quanted_layers


def _small_net():
    paddle.seed(0)
    return nn.Sequential(
        nn.Conv2D(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def test_seed_example_small():
    """The seed's example (mobilenet_v1, PACT, summary) on a small MobileNet."""
    from paddle.vision.models import mobilenet_v1

    net = mobilenet_v1(scale=0.25, pretrained=False, num_classes=10)
    quant_config = {
        "activation_preprocess_type": "PACT",
        "quantizable_layer_type": ["Conv2D", "Linear"],
    }
    quanter = QAT(config=quant_config)
    assert quanter.quantize(net) is net
    info = paddle.summary(net, (1, 3, 64, 64))
    assert info["total_params"] > 0
    assert len(list(iter_quanted_layers(net))) == 28  # 27 convolutions + the classifier
    assert all(layer.act_pact for _, layer in iter_quanted_layers(net))


@pytest.mark.slow
def test_seed_example_verbatim(tmp_path, monkeypatch, caplog):
    """The seed's whole QAT example, import changed (224px MobileNetV1, untrained): it writes the model.

    Untrained, its activations vanish (the deep layers saw only zeros and stay float) and its
    outputs are (near) zero, so top-1 agreement on random inputs measures nothing: the export
    writes the model, says why its check is weak, and the written model runs int8.
    """
    monkeypatch.chdir(tmp_path)
    import paddle
    from paddle.vision.models import mobilenet_v1

    from qtrainer.quant import QAT

    net = mobilenet_v1(pretrained=False)
    quant_config = {
        "activation_preprocess_type": "PACT",
        "quantizable_layer_type": ["Conv2D", "Linear"],
    }
    quanter = QAT(config=quant_config)
    quanter.quantize(net)
    paddle.summary(net, (1, 3, 224, 224))
    with caplog.at_level(logging.WARNING, logger="qtrainer.quant.export"):
        report = quanter.save_quantized_model(
            net, "./quant_model",
            input_spec=[paddle.static.InputSpec(shape=[None, 3, 224, 224], dtype="float32")])
    assert report.written and report.passed
    for suffix in (".pdmodel", ".pdiparams", ".quant.json"):
        assert (tmp_path / f"quant_model{suffix}").is_file()
    assert any("self-check is weak" in r.getMessage() for r in caplog.records)
    assert any("random inputs" in c for c in report.check.caveats)
    # it runs int8: one int8 op per layer exported int8, in the report and in the written model
    assert len(report.int8_layers) >= 1
    assert sum(report.check.int8_ops.values()) == report.check.expected_int8_ops == len(report.int8_layers)
    assert sum(load_int8_predictor(str(tmp_path / "quant_model"))[1].values()) == len(report.int8_layers)


def test_defaults_and_a_quantconfig_instance():
    assert QAT().config == QuantConfig()
    cfg = QuantConfig(weight_bits=4)
    assert QAT(cfg).config is cfg
    assert QAT(config={"weight_bits": 4}).config.weight_bits == 4


@pytest.mark.parametrize("key", ["weight_bits", "activation_bits"])
def test_bits_above_eight_are_refused_at_construction(key):
    """The export keeps >8-bit layers float (no CPU kernels): refused now, not after the training."""
    with pytest.raises(ValueError, match=rf"{key}=16 in QAT config.*none above 8 bits.*from 2 to 8"):
        QAT(config={key: 16})
    assert QAT(config={key: 8}).config.weight_bits == 8


def test_config_errors_surface_at_construction():
    with pytest.raises(ValueError, match="QAT config"):
        QAT(config={"activation_quantize_typ": "abs_max"})
    with pytest.raises(ValueError, match="moving_rate"):
        QAT(config={"moving_rate": 1})


def test_user_classes_are_checked_at_construction():
    with pytest.raises(TypeError, match="act_quantize"):
        QAT(act_quantize=nn.Identity())
    with pytest.raises(TypeError, match="weight_preprocess"):
        QAT(weight_preprocess=dict)


def test_quantize_in_place_then_train_and_eval():
    net = _small_net()
    quanter = QAT()
    quanter.quantize(net)
    assert isinstance(net[0], QuantedConv2D)
    opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=net.parameters())
    x = paddle.randn([2, 3, 6, 6])
    for _ in range(2):
        loss = net(x).mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
    net.eval()
    assert np.all(np.isfinite(net(x).numpy()))


def test_quantize_twice_raises():
    net = _small_net()
    quanter = QAT()
    quanter.quantize(net)
    with pytest.raises(ValueError, match="already quantized"):
        quanter.quantize(net)
    with pytest.raises(ValueError, match="already quantized"):
        QAT().quantize(net)


def test_save_before_quantize_is_a_clear_error():
    with pytest.raises(ValueError, match=r"call QAT.quantize\(model\)"):
        QAT().save_quantized_model(_small_net(), "/tmp/never_written")


def test_save_requires_a_layer():
    with pytest.raises(TypeError, match="paddle.nn.Layer"):
        QAT().save_quantized_model("net", "/tmp/never_written")


def test_save_delegates_to_the_export(monkeypatch):
    calls = []
    def export_quantized_model(model, path, input_spec=None, **kwargs):
        calls.append((model, path, input_spec, kwargs))
        return "report"

    monkeypatch.setattr("qtrainer.quant.methods.qat.export_quantized_model", export_quantized_model)
    net = _small_net()
    quanter = QAT()
    quanter.quantize(net)
    spec = [paddle.static.InputSpec([None, 3, 6, 6], "float32")]
    assert quanter.save_quantized_model(net, "./quant_model", input_spec=spec, check=False) == "report"
    assert calls == [(net, "./quant_model", spec, {"check": False})]


def test_custom_quanter_example_runs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "examples" / "custom_quanter.py"
    spec = importlib.util.spec_from_file_location("custom_quanter_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    stats = example.main(steps=3)
    assert list(stats) == ["features.0", "features.4", "fc"]
    for entry in stats.values():
        assert entry["act_scale"] > 0 and np.all(entry["weight_scale"] > 0)
        assert np.isfinite(entry["weight_sqnr_db"])
