"""The recipe runner: bad input gets clear errors; a reduced end-to-end run on generated folders."""
from __future__ import annotations

import json
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from recipes import run


def write_folder(root, classes=("a", "b"), train=8, val=4, size=12):
    rng = np.random.RandomState(0)
    for split, count in (("train", train), ("val", val)):
        for label, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 120 * label, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return str(root)


def args(tmp_path, *extra):
    return ["--out", str(tmp_path / "out"), "--image-size", "32", "--batch-size", "4", "--val-batches", "2",
            "--threads", "1", "--check-time-limit", "20", *extra]


@pytest.mark.parametrize("argv, message", [
    (["vgg16", "fp32"], "invalid choice: 'vgg16' (choose from 'mobilenet_v1', 'mobilenet_v2', 'resnet18', 'resnet50')"),
    (["resnet18", "distill"], "invalid choice: 'distill' (choose from 'fp32', 'control', 'qat', 'ptq', 'dynamic', 'all')"),
    (["resnet18", "fp32", "--width", "0.5"], "--width applies to MobileNets only"),
])
def test_unknown_arch_method_or_option_lists_the_choices(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


def test_max_steps_alone_trains_as_many_epochs_as_they_take(tmp_path):
    """`--max-steps 2800` on a 937-step epoch must not stop at the recipe's default of one epoch."""
    default = run.parse_args(["mobilenet_v1", "all"])
    assert (default.fp32_epochs, default.fp32_max_steps, default.qat_epochs, default.qat_max_steps) == (1, 600, 1, 150)
    steps = run.parse_args(["mobilenet_v1", "all", "--max-steps", "2800", "--qat-max-steps", "1000"])
    assert (steps.fp32_epochs, steps.fp32_max_steps, steps.qat_epochs, steps.qat_max_steps) == (None, 2800, None, 1000)
    both = run.parse_args(["mobilenet_v1", "all", "--epochs", "2", "--max-steps", "2800"])
    assert (both.fp32_epochs, both.fp32_max_steps) == (2, 2800)
    epochs = run.parse_args(["mobilenet_v1", "all", "--epochs", "3"])
    assert (epochs.fp32_epochs, epochs.fp32_max_steps) == (3, None)
    # and the trainer really goes past the first epoch: 2 images a class, batch 4 -> 1 step an epoch
    data = write_folder(tmp_path / "data", train=2)
    run.main(["mobilenet_v1", "fp32", "--data", data, "--max-steps", "3", *args(tmp_path)])
    with open(tmp_path / "out" / "mobilenet_v1" / "fp32" / "results.json") as handle:
        assert json.load(handle)["steps"] == 3


def test_data_that_is_not_imagenet_style_says_what_layout_is_expected(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(Exception, match="train"):
        run.main(["mobilenet_v1", "fp32", "--data", str(tmp_path / "flat"), *args(tmp_path)])
    with pytest.raises(Exception, match="does not exist|not found|no such"):
        run.main(["mobilenet_v1", "fp32", "--data", str(tmp_path / "missing"), *args(tmp_path)])


def test_quantizing_without_fp32_weights_requires_from_scratch(tmp_path):
    data = write_folder(tmp_path / "data")
    with pytest.raises(SystemExit, match="needs FP32 weights.*--from-scratch"):
        run.main(["resnet18", "qat", "--data", data, *args(tmp_path)])


def test_pretrained_file_of_another_architecture_names_the_keys(tmp_path):
    data = write_folder(tmp_path / "data")
    path = str(tmp_path / "mbv1.pdparams")
    paddle.save(paddle.vision.models.mobilenet_v1(scale=0.25, num_classes=2).state_dict(), path)
    with pytest.raises(SystemExit, match=r"does not match resnet18.*missing \['bn1"):
        run.main(["resnet18", "dynamic", "--data", data, "--pretrained", path, *args(tmp_path)])


def test_all_methods_end_to_end_on_a_small_slice(tmp_path):
    data = write_folder(tmp_path / "data")
    common = ["--data", data, "--width", "0.25", "--calib-batches", "2", *args(tmp_path)]
    summary = run.main(["mobilenet_v1", "all", "--max-steps", "3", "--qat-max-steps", "2", *common])
    assert list(summary) == ["fp32", "control", "ptq", "qat", "dynamic"]
    # the control trains as QAT does (its steps, from the FP32 weights) and is what QAT is read against
    assert summary["control"]["steps"] == summary["qat"]["steps"] == 2 and summary["fp32"]["steps"] == 3
    control = json.load(open(tmp_path / "out" / "mobilenet_v1" / "control" / "results.json"))
    assert control["from"].endswith(os.path.join("fp32", "net.pdparams"))
    assert run._baseline_of("qat", summary) == "control" and run._baseline_of("ptq", summary) == "fp32"
    assert all(row["what"] for row in summary.values())
    ptq = json.load(open(tmp_path / "out" / "mobilenet_v1" / "ptq" / "results.json"))
    assert ptq["calibrator"] == "KLQuantizer" and ptq["images"] == 8 and ptq["agreement_top1"] >= 0.75
    qat = json.load(open(tmp_path / "out" / "mobilenet_v1" / "qat" / "results.json"))
    assert qat["images"] == 8 and qat["agreement_top1"] >= 0.75
    # every layer the export kept in int8 really runs int8 in Paddle Inference
    assert sum(qat["int8_ops"].values()) == len(qat["export_check"]["int8_layers"]) > 0
    dynamic = json.load(open(tmp_path / "out" / "mobilenet_v1" / "dynamic" / "results.json"))
    assert dynamic["params_ratio"] <= 0.35  # BatchNorm parameters stay float in this narrow model
    assert os.path.isdir(tmp_path / "out" / "mobilenet_v1" / "qat" / "version_0")  # TensorBoard run
    assert run.parse_args(["mobilenet_v1", "qat", "--export", "onnx"]).export_kwargs["formats"] == ("paddle", "onnx")
    both = run.parse_args(["mobilenet_v1", "qat", "--export", "onnx", "--runtime", "openvino"])
    assert both.export_kwargs["formats"] == ("paddle", "onnx", "openvino")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18", "resnet50"])
def test_every_other_architecture_runs_every_method(tmp_path, arch):
    """The README's four architectures x four methods: the three not covered above, reduced."""
    data = write_folder(tmp_path / "data")
    width = ["--width", "0.25"] if arch.startswith("mobilenet") else []
    # a tiny learning rate: two Adam steps on batches of 4 can send ResNet50's eval-mode activations to
    # 1e30, which the calibrators refuse as divergence (a clear error, tested elsewhere)
    summary = run.main([arch, "all", "--max-steps", "2", "--qat-max-steps", "1", "--calib-batches", "1",
                        "--lr", "1e-6", "--qat-lr", "1e-6", "--data", data, *width, *args(tmp_path)])
    assert list(summary) == ["fp32", "control", "ptq", "qat", "dynamic"]
    for method in ("ptq", "qat"):
        result = json.load(open(tmp_path / "out" / arch / method / "results.json"))
        assert result["images"] == 8 and sum(result["int8_ops"].values()) > 0, (method, result["int8_ops"])
    dynamic = json.load(open(tmp_path / "out" / arch / "dynamic" / "results.json"))
    assert dynamic["params_ratio"] < 0.5


def test_a_second_run_in_the_same_out_dir_is_refused_before_training(tmp_path, monkeypatch):
    """The main command run twice: refused at once (nothing retrained, the FP32 weights kept), not at the export."""
    data = write_folder(tmp_path / "data", train=2)
    run.main(["mobilenet_v1", "fp32", "--data", data, "--max-steps", "1", *args(tmp_path)])
    weights = tmp_path / "out" / "mobilenet_v1" / "fp32" / "net.pdparams"
    before = weights.read_bytes()
    monkeypatch.setattr(run, "build_loaders", lambda s: pytest.fail("loaded data and trained before refusing"))
    with pytest.raises(SystemExit, match=r"already holds the results of an earlier run \(fp32/net\.pdparams.*--overwrite"):
        run.main(["mobilenet_v1", "all", "--data", data, "--max-steps", "1", *args(tmp_path)])
    assert weights.read_bytes() == before


def test_overwrite_replaces_an_earlier_runs_export(tmp_path):
    data = write_folder(tmp_path / "data", train=2)
    common = ["--data", data, "--width", "0.25", "--calib-batches", "1", *args(tmp_path), "--check-time-limit", "0"]
    run.main(["mobilenet_v1", "ptq", "--from-scratch", *common])
    first = json.load(open(tmp_path / "out" / "mobilenet_v1" / "ptq" / "export" / "model.quant.json"))["run_id"]
    run.main(["mobilenet_v1", "ptq", "--from-scratch", "--overwrite", *common])
    second = json.load(open(tmp_path / "out" / "mobilenet_v1" / "ptq" / "export" / "model.quant.json"))
    assert second["run_id"] != first and second["state"] == "complete"


def test_pretrained_file_of_random_bytes_names_the_file(tmp_path):
    data = write_folder(tmp_path / "data")
    path = tmp_path / "noise.pdparams"
    path.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(SystemExit, match=r"--pretrained '.*noise\.pdparams' is not a Paddle state dict"):
        run.main(["resnet18", "dynamic", "--data", data, "--pretrained", str(path), *args(tmp_path)])


@pytest.mark.slow
def test_openvino_runtime_evaluates_every_method_on_openvino(tmp_path):
    """``--runtime openvino --export onnx``: the exports also write the IR and the ONNX model; the deployed
    numbers come from OpenVINO, with Paddle Inference's and onnxruntime's beside them."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'qtrainer[openvino]')")
    data = write_folder(tmp_path / "data")
    summary = run.main(["mobilenet_v2", "all", "--max-steps", "2", "--qat-max-steps", "1", "--calib-batches", "1",
                        "--lr", "1e-6", "--qat-lr", "1e-6", "--width", "0.25", "--data", data, "--runtime", "openvino",
                        "--export", "onnx", *args(tmp_path)])
    assert list(summary) == ["fp32", "control", "ptq", "qat", "dynamic"]
    for method in ("fp32", "control", "ptq", "qat", "dynamic"):
        result = json.load(open(tmp_path / "out" / "mobilenet_v2" / method / "results.json"))
        assert result["runtime"] == "openvino" and result["images"] == 8, method
    for method in ("ptq", "qat"):
        result = json.load(open(tmp_path / "out" / "mobilenet_v2" / method / "results.json"))
        assert result["int8_ops"]["int8_compute"] > 0
        assert os.path.isfile(tmp_path / "out" / "mobilenet_v2" / method / "export" / "model.xml")
        # the same model on the other runtimes whose files the export wrote
        assert result["paddle"]["runtime"] == "paddle" and result["onnxruntime"]["int8_ops"]["int8_compute"] > 0
