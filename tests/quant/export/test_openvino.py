"""OpenVINO runtime of the int8 export: IR files, agreement with the simulation, int8 nodes, failures."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant.export import export_quantized_model
from qtrainer.quant.export import openvino as qov
from qtrainer.quant.export.inference import create_predictor, run_predictor
from qtrainer.quant.export.isa import has_vnni
from qtrainer.quant.export.selfcheck import dygraph_outputs
from qtrainer.quant.methods.qat import QAT

NEEDS_OPENVINO = "OpenVINO is not installed (pip install 'qtrainer[openvino]')"
#: Without VNNI, OpenVINO's u8 x s8 convolutions sum pairs of products in 16 bits (NNCF's "overflow fix"
#: exists for those CPUs), and the export keeps u8 codes up to 255: the numbers are asserted on VNNI CPUs;
#: elsewhere what is asserted is that the check reports what it measured.
EXACT_INT8 = has_vnni()


def assert_agrees(result: dict, max_rel_l2: float) -> None:
    if EXACT_INT8:
        assert result["passed"], result["failures"]
        assert result["rel_l2"] <= max_rel_l2
    else:
        assert result["passed"] == (not result["failures"])
        assert result["rel_l2"] <= max_rel_l2 or not result["passed"]


def tiny_conv_net() -> nn.Layer:
    """Two convolutions (one with a batch norm) and a Linear head, on 3 x 32 x 32 images."""
    return nn.Sequential(
        nn.Conv2D(3, 16, 3, padding=1), nn.BatchNorm2D(16), nn.ReLU(),
        nn.Conv2D(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(32, 10),
    )


def float_weight_count(net: nn.Layer) -> int:
    return sum(int(np.prod(p.shape)) for n, p in net.named_parameters() if n.endswith("weight") and len(p.shape) > 1)


def image_batches(seed: int = 0, count: int = 3, size: int = 16) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.rand(size, 3, 32, 32).astype("float32") for _ in range(count)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A QAT model (scales observed on three batches), its int8 export, and the OpenVINO IR of it."""
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    paddle.seed(0)
    net = tiny_conv_net()
    weights = float_weight_count(net)
    QAT().quantize(net)
    batches = image_batches()
    net.train()
    with paddle.no_grad():
        for batch in batches:
            net(paddle.to_tensor(batch))
    net.eval()
    prefix = str(tmp_path_factory.mktemp("openvino") / "model")
    report = export_quantized_model(net, prefix, sample_inputs=batches)
    assert report.passed, report.summary()
    written = qov.write_openvino(prefix)
    return {"net": net, "prefix": prefix, "report": report, "batches": batches, "written": written,
            "float_weights": weights}


# ---------------------------------------------------------------------- writing
def test_write_openvino_writes_xml_and_bin(exported):
    prefix = exported["prefix"]
    assert exported["written"] == [prefix + ".xml", prefix + ".bin"]
    assert all(os.path.getsize(path) > 0 for path in exported["written"])
    leftovers = [n for n in os.listdir(os.path.dirname(prefix)) if n.startswith(".")]
    assert leftovers == []  # the staging directory is gone


def test_openvino_weights_stay_int8(exported):
    import openvino as ov

    model = ov.Core().read_model(exported["prefix"] + ".xml")
    constants = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]
    types = {str(op.get_element_type()) for op in constants}
    int8_weights = [op for op in constants if op.get_element_type() == ov.Type.i8]
    assert len(int8_weights) == len(exported["report"].int8_layers)
    assert "<Type: 'float16'>" not in types  # compress_to_fp16 is off
    # int8 codes plus a few float scales and biases: about a quarter of the float weights' bytes
    assert os.path.getsize(exported["prefix"] + ".bin") < 0.3 * 4 * exported["float_weights"]


# ---------------------------------------------------------------------- running and checking
def test_openvino_agrees_with_the_simulation_and_runs_every_conv_int8(exported):
    report = exported["report"]
    batches = [[b] for b in exported["batches"]]
    reference = dygraph_outputs(exported["net"], batches)
    result = qov.check_openvino(exported["prefix"] + ".xml", batches, reference,
                                max_rel_l2=report.check.max_rel_l2, min_agreement=report.check.min_agreement,
                                expected_int8_ops=report.check.expected_int8_ops)
    assert_agrees(result, report.check.max_rel_l2)
    # every int8 layer of the export runs int8: the convolutions, and the Linear (a Gemm in the ONNX model
    # the IR is converted from: a fully-connected node)
    precisions = result["precisions"]
    assert precisions["int8_compute"] == report.check.expected_int8_ops, precisions
    assert precisions["int8_convolutions"] == report.check.expected_int8_ops - 1
    assert precisions["float_compute"] == 0 and precisions["float_nodes"] == []
    assert result["int8_ok"] and result["notes"] == []
    json.dumps(result)  # plain JSON data


def test_run_openvino_follows_run_predictor_conventions(exported):
    prefix = exported["prefix"]
    batches = [exported["batches"][0][:5], (exported["batches"][1][:3],)]  # an array, or a tuple per input
    compiled = qov.load_openvino(prefix + ".xml", num_threads=1)
    got = qov.run_openvino(compiled, batches)
    want = run_predictor(create_predictor(prefix), batches)
    assert [g.shape for g in got] == [w.shape for w in want] == [(8, 10)]
    assert got[0].dtype == np.float32
    with pytest.raises(ValueError, match="takes 1 input"):
        qov.run_openvino(compiled, [(exported["batches"][0], exported["batches"][0])])


def test_load_openvino_can_fix_the_batch_size(exported):
    compiled = qov.load_openvino(exported["prefix"] + ".xml", num_threads=2, batch_size=4)
    assert list(compiled.inputs[0].get_shape()) == [4, 3, 32, 32]
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert qov.run_openvino(compiled, [exported["batches"][0][:4]])[0].shape == (4, 10)
    with pytest.raises(ValueError, match="batch_size=0"):
        qov.load_openvino(exported["prefix"] + ".xml", batch_size=0)


def test_runtime_precisions_lists_each_compute_node(exported):
    compiled = qov.load_openvino(exported["prefix"] + ".xml")
    precisions = qov.runtime_precisions(compiled)
    # the convolutions, and the Linear head as a fully-connected node (the IR comes from our ONNX's Gemm)
    assert {n["layer_type"] for n in precisions["nodes"]} == {"Convolution", "FullyConnected"}
    assert all(n["precision"] in ("u8", "i8") for n in precisions["nodes"])
    assert precisions["summary"]["int8_compute"] == len(precisions["nodes"])


# ---------------------------------------------------------------------- errors
def test_missing_openvino_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'qtrainer\[openvino\]'"):
        qov.require_openvino()
    with pytest.raises(ImportError, match="OpenVINO is not installed"):
        qov.write_openvino(str(tmp_path / "model"))


def test_load_openvino_refuses_a_non_xml_path(exported):
    with pytest.raises(ValueError, match="ending with '.xml'"):
        qov.load_openvino(exported["prefix"] + ".pdmodel")


def test_write_openvino_without_a_model_names_the_missing_files(tmp_path):
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    with pytest.raises(FileNotFoundError, match=r"model\.pdmodel"):
        qov.write_openvino(str(tmp_path / "model"))


def _old_ir(prefix: str) -> dict[str, bytes]:
    old = {prefix + ".xml": b"<old xml/>", prefix + ".bin": b"old weights"}
    for path, data in old.items():
        with open(path, "wb") as handle:
            handle.write(data)
    return old


def _unchanged(directory, old: dict[str, bytes], names: list[str]) -> None:
    assert sorted(os.listdir(directory)) == sorted(names)  # no temporary file or directory left
    for path, data in old.items():
        with open(path, "rb") as handle:
            assert handle.read() == data


def test_a_failed_conversion_leaves_no_file(tmp_path):
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    prefix = str(tmp_path / "model")
    for suffix in (".pdmodel", ".pdiparams"):
        with open(prefix + suffix, "wb") as handle:
            handle.write(b"\x08\x01 not a paddle program")
    old = _old_ir(prefix)
    with pytest.raises(ValueError, match=r"model\.pdmodel' is not a legacy Paddle program"):
        qov.write_openvino(prefix)
    _unchanged(tmp_path, old, ["model.pdmodel", "model.pdiparams", "model.xml", "model.bin"])


def test_a_failed_save_leaves_the_old_ir(exported, tmp_path, monkeypatch):
    import openvino as ov

    prefix = str(tmp_path / "model")
    for suffix in (".pdmodel", ".pdiparams"):
        with open(exported["prefix"] + suffix, "rb") as src, open(prefix + suffix, "wb") as dst:
            dst.write(src.read())
    old = _old_ir(prefix)

    def half_save(model, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"<net")
        raise OSError("disk full")

    monkeypatch.setattr(ov, "save_model", half_save)
    with pytest.raises(OSError, match="disk full"):
        qov.write_openvino(prefix)
    _unchanged(tmp_path, old, ["model.pdmodel", "model.pdiparams", "model.xml", "model.bin"])


# ---------------------------------------------------------------------- export_quantized_model(formats=...)
def test_export_writes_and_checks_the_openvino_ir(exported, tmp_path):
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    prefix = str(tmp_path / "both")
    report = export_quantized_model(exported["net"], prefix, sample_inputs=exported["batches"],
                                    formats=("paddle", "openvino"), measure_speed=False,
                                    on_failure="raise" if EXACT_INT8 else "write")
    assert os.path.isfile(prefix + ".xml") and os.path.isfile(prefix + ".bin")
    on_disk = json.load(open(prefix + ".quant.json"))
    assert {"both.xml", "both.bin"} <= set(on_disk["sha256"])  # published and verified with the rest
    ov = on_disk["openvino"]
    assert_agrees(ov, 0.05)
    assert ov["precisions"]["int8_compute"] == sum(report.check.int8_ops.values()) == len(report.int8_layers)
    assert "OpenVINO" in report.summary()
    # a Paddle-only export over it removes the IR the new export does not have
    export_quantized_model(exported["net"], prefix, sample_inputs=exported["batches"], overwrite=True,
                           measure_speed=False)
    assert not os.path.exists(prefix + ".xml") and not os.path.exists(prefix + ".bin")


def test_the_ir_clamps_float_values_before_the_fake_quantize(exported, tmp_path):
    """Explicit clips become clamps of the u8 codes in our ONNX; in the IR each is a float ``Clamp``
    before its FakeQuantize (``code_clamps``), which OpenVINO folds into it, and the IR still
    computes what the simulation computes."""
    pytest.importorskip("openvino", reason=NEEDS_OPENVINO)
    import copy

    import openvino as ov

    prefix = str(tmp_path / "clipped")
    net = copy.deepcopy(exported["net"])
    report = export_quantized_model(net, prefix, sample_inputs=exported["batches"], clip_activations=True,
                                    formats=("paddle", "openvino"), fallback=False, measure_speed=False,
                                    on_failure="write")
    assert all(layer.act_clip for layer in report.layers)
    clamps = [op for op in ov.Core().read_model(prefix + ".xml").get_ops() if op.get_type_name() == "Clamp"]
    assert len(clamps) >= len(report.int8_layers) - 1  # every int8 layer's clip but the image's
    assert all(op.get_input_element_type(0) == ov.Type.f32 for op in clamps)
    assert_agrees(report.openvino, 0.05)


def test_export_formats_are_checked_before_any_work(exported, tmp_path, monkeypatch):
    for formats, message in ((("paddle", "onnxx"), "accepted names"), (("openvino",), "'paddle' must be"),
                             ("paddle", "must be a tuple")):
        with pytest.raises((ValueError, TypeError), match=message):
            export_quantized_model(exported["net"], str(tmp_path / "bad"), sample_inputs=exported["batches"],
                                   formats=formats)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match=r"qtrainer\[openvino\]"):
        export_quantized_model(exported["net"], str(tmp_path / "bad"), sample_inputs=exported["batches"],
                               formats=("paddle", "openvino"))
    assert not any(tmp_path.iterdir())  # nothing written
