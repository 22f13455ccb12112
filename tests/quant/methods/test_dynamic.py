"""Dynamic (weight-only) quantization of saved inference models, checked through Paddle Inference."""
from __future__ import annotations

import json
import os

import numpy as np
import paddle
import paddle.inference as paddle_infer
import pytest
from paddle import nn
from paddle.base.proto import framework_pb2

from qtrainer.quant.methods.dynamic import SUPPORTED_OP_TYPES, quant_post_dynamic, quantize_dygraph_weights

INPUT_SPEC = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "image")]
INT8, INT16, FP32 = (framework_pb2.VarType.INT8, framework_pb2.VarType.INT16, framework_pb2.VarType.FP32)


class SmallCNN(nn.Layer):
    """conv → depthwise conv → 1×1 conv → two Linear layers; the first Linear holds most weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2D(1, 16, 3, padding=1)
        self.depthwise = nn.Conv2D(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2D(16, 32, 1)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv(x)), 2)
        x = nn.functional.relu(self.pointwise(nn.functional.relu(self.depthwise(x))))
        x = paddle.flatten(nn.functional.max_pool2d(x, 2), 1)
        return self.fc2(nn.functional.relu(self.fc1(x)))


class NoWeights(nn.Layer):
    """Only an elementwise op reads its 2-D parameter: nothing quantizable."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = self.create_parameter([4, 4])

    def forward(self, x):
        return x + self.offset


def export(layer: nn.Layer, prefix: str, input_spec) -> str:
    layer.eval()
    with paddle.pir_utils.DygraphOldIrGuard():
        paddle.jit.save(layer, prefix, input_spec=input_spec)
    return prefix


def predict(model_file: str, params_file: str, x: np.ndarray, mkldnn: bool = False, pir: bool = False) -> np.ndarray:
    config = paddle_infer.Config(model_file, params_file)
    config.disable_gpu()
    config.disable_glog_info()
    config.set_cpu_math_library_num_threads(1)
    config.enable_mkldnn() if mkldnn else config.disable_mkldnn()
    if pir:
        config.enable_new_ir(True)
        config.enable_new_executor(True)
    predictor = paddle_infer.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(x.shape)
    handle.copy_from_cpu(x)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def read_program(path: str) -> framework_pb2.ProgramDesc:
    desc = framework_pb2.ProgramDesc()
    with open(path, "rb") as stream:
        desc.ParseFromString(stream.read())
    return desc


def var_dtypes(desc) -> dict[str, int]:
    return {v.name: v.type.dense_tensor.tensor.data_type for v in desc.blocks[0].vars
            if v.type.type == framework_pb2.VarType.DENSE_TENSOR}


def op_inputs(op) -> dict[str, list[str]]:
    return {slot.parameter: list(slot.arguments) for slot in op.inputs}


def op_outputs(op) -> dict[str, list[str]]:
    return {slot.parameter: list(slot.arguments) for slot in op.outputs}


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randn(8, 1, 28, 28).astype("float32")


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory, images):
    """(model dir, dygraph logits of ``images``)."""
    paddle.seed(0)
    model = SmallCNN()
    model.eval()
    directory = tmp_path_factory.mktemp("fp32")
    export(model, str(directory / "model"), INPUT_SPEC)
    return str(directory), model(paddle.to_tensor(images)).numpy()


@pytest.fixture(scope="module", params=[8, 16], ids=["int8", "int16"])
def quantized(request, fp32_model, tmp_path_factory):
    """(bits, report) of the small CNN quantized with the defaults."""
    out = tmp_path_factory.mktemp(f"int{request.param}")
    return request.param, quant_post_dynamic(fp32_model[0], str(out), weight_bits=request.param)


def test_params_file_shrinks_below_the_target_ratio(quantized, fp32_model):
    bits, report = quantized
    fp32_bytes = os.path.getsize(os.path.join(fp32_model[0], "model.pdiparams"))
    ratio = os.path.getsize(report["output"]["params"]) / fp32_bytes
    assert ratio <= {8: 0.3, 16: 0.55}[bits]
    assert ratio > {8: 0.2, 16: 0.45}[bits]  # int8/int16 codes, not a dropped weight
    assert report["output"]["params_ratio"] == pytest.approx(ratio)


@pytest.mark.parametrize("mkldnn", [False, True], ids=["plain", "mkldnn"])
@pytest.mark.parametrize("pir", [False, True], ids=["legacy-ir", "pir"])
def test_paddle_inference_predicts_like_fp32(quantized, fp32_model, images, mkldnn, pir):
    bits, report = quantized
    logits = predict(report["output"]["model"], report["output"]["params"], images, mkldnn=mkldnn, pir=pir)
    error = relative_l2(logits, fp32_model[1])
    # measured: int8 ≈ 8e-3, int16 ≈ 3e-5 (weights ≈ 0.4% / 0.002% off)
    assert error < {8: 0.02, 16: 2e-4}[bits]
    assert error > 0  # the weights really changed


def test_every_conv_and_linear_weight_is_stored_as_integers(quantized, fp32_model):
    bits, report = quantized
    with open(report["report"]) as stream:
        saved = json.load(stream)
    by_name = {q["name"]: q for q in saved["quantized"]}
    assert saved["skipped"] == []
    assert sorted(q["op_types"][0] for q in saved["quantized"]) == [
        "conv2d", "conv2d", "depthwise_conv2d", "matmul_v2", "matmul_v2"]
    linear = [q for q in saved["quantized"] if q["op_types"] == ["matmul_v2"]]
    assert {tuple(q["shape"]) for q in linear} == {(1568, 128), (128, 10)}
    assert all(q["axis"] == 1 and q["channels"] == q["shape"][1] and q["bits"] == bits for q in linear)
    convs = [q for q in saved["quantized"] if "conv" in q["op_types"][0]]
    assert all(q["axis"] == 0 and q["channels"] == q["shape"][0] for q in convs)

    desc = read_program(report["output"]["model"])
    dtypes = var_dtypes(desc)
    producers = {out: op for op in desc.blocks[0].ops for outs in op_outputs(op).values() for out in outs}
    quantized_type = INT8 if bits == 8 else INT16
    for op in desc.blocks[0].ops:
        if op.type in ("conv2d", "depthwise_conv2d", "matmul_v2"):
            weight_input = op_inputs(op)["Filter" if "conv" in op.type else "Y"][0]
            multiply = producers[weight_input]
            assert multiply.type == "elementwise_mul"
            cast = producers[op_inputs(multiply)["X"][0]]
            assert cast.type == "cast"
            stored = op_inputs(cast)["X"][0]
            assert stored in by_name and dtypes[stored] == quantized_type
            assert dtypes[op_inputs(multiply)["Y"][0]] == FP32


def test_process_mode_is_left_as_it_was(fp32_model, tmp_path):
    pir_flag = paddle.get_flags("FLAGS_enable_pir_api")
    quant_post_dynamic(fp32_model[0], str(tmp_path / "ok"))
    assert paddle.in_dynamic_mode()
    assert paddle.get_flags("FLAGS_enable_pir_api") == pir_flag
    with pytest.raises(ValueError):  # fails inside the static-graph section
        quant_post_dynamic(fp32_model[0], str(tmp_path / "none"), quantizable_op_type=["mul"])
    assert paddle.in_dynamic_mode()
    assert paddle.get_flags("FLAGS_enable_pir_api") == pir_flag
    assert float((paddle.ones([2]) * 3).sum()) == 6.0  # dygraph still computes


def _save_static_model(prefix: str, build) -> None:
    """Build a legacy program in static mode with ``build(x) -> (out, {param name: value})`` and save it."""
    with paddle.pir_utils.OldIrGuard():
        main, startup = paddle.static.Program(), paddle.static.Program()
        with paddle.static.program_guard(main, startup):
            x = paddle.static.data("x", [None, 64], "float32")
            out, values = build(main.global_block(), x)
        executor = paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(paddle.static.Scope()):
            executor.run(startup)
            for name, value in values.items():
                paddle.static.global_scope().find_var(name).get_tensor().set(value, paddle.CPUPlace())
            paddle.static.save_inference_model(prefix, [x], [out], executor, program=main)


def _matmul_with_transposed_weight(op_type: str):
    """``x @ W^T`` with W [12, 64] whose row i (output channel i) is scaled by 10 ** (-3 .. 2)."""
    weight = np.random.RandomState(1).randn(12, 64).astype("float32")
    weight *= (10.0 ** np.linspace(-3, 2, 12, dtype="float32"))[:, None]
    attrs = {"trans_x": False, "trans_y": True} if op_type == "matmul_v2" else {
        "transpose_X": False, "transpose_Y": True, "alpha": 1.0}

    def build(block, x):
        w = paddle.static.create_parameter([12, 64], "float32", name="w_rows")
        out = block.create_var(name="out", dtype="float32", shape=[-1, 12])
        block.append_op(type=op_type, inputs={"X": [x], "Y": [w]}, outputs={"Out": [out]}, attrs=attrs)
        return out, {"w_rows": weight}
    return build


@pytest.mark.parametrize("op_type", ["matmul_v2", "matmul"])
def test_transposed_weight_is_quantized_per_output_row(tmp_path, op_type):
    prefix = str(tmp_path / "fp32" / "model")
    _save_static_model(prefix, _matmul_with_transposed_weight(op_type))
    x = np.random.RandomState(2).randn(16, 64).astype("float32")
    reference = predict(prefix + ".pdmodel", prefix + ".pdiparams", x)
    errors = {}
    for scheme in ("channel_wise_abs_max", "abs_max"):
        report = quant_post_dynamic(prefix, str(tmp_path / scheme), weight_quantize_type=scheme)
        (entry,) = report["quantized"]
        assert entry["op_types"] == [op_type]
        assert (entry["axis"], entry["channels"]) == ((0, 12) if scheme == "channel_wise_abs_max" else (None, 1))
        logits = predict(report["output"]["model"], report["output"]["params"], x)
        # error of the worst output channel, so the tiny rows count as much as the large ones
        errors[scheme] = max(relative_l2(logits[:, i], reference[:, i]) for i in range(12))
    assert errors["channel_wise_abs_max"] < 0.03  # measured ≈ 0.013 (int8 rounding of 64-wide rows)
    assert errors["abs_max"] > 0.5  # one scale for all rows wipes out the small ones


def test_mul_weight_of_static_fc_is_quantized_per_output_column(tmp_path):
    prefix = str(tmp_path / "static" / "model")
    _save_static_model(prefix, lambda block, x: (paddle.static.nn.fc(x, 48), {}))
    x = np.random.RandomState(3).randn(4, 64).astype("float32")
    reference = predict(prefix + ".pdmodel", prefix + ".pdiparams", x)
    report = quant_post_dynamic(str(tmp_path / "static"), str(tmp_path / "q"))
    (entry,) = report["quantized"]
    assert (entry["op_types"], entry["axis"], entry["channels"]) == (["mul"], 1, 48)
    assert relative_l2(predict(report["output"]["model"], report["output"]["params"], x), reference) < 0.02


def test_unselected_op_types_are_reported_as_skipped(fp32_model, tmp_path, images):
    report = quant_post_dynamic(fp32_model[0], str(tmp_path), quantizable_op_type=["conv2d", "depthwise_conv2d"])
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert len(skipped) == 2 and all("'matmul_v2' is not in quantizable_op_type" in r for r in skipped.values())
    dtypes = var_dtypes(read_program(report["output"]["model"]))
    assert all(dtypes[name] == FP32 for name in skipped)
    assert len(report["quantized"]) == 3
    logits = predict(report["output"]["model"], report["output"]["params"], images)
    assert relative_l2(logits, fp32_model[1]) < 0.02


def test_generate_test_model_writes_float_weights_with_quantized_values(fp32_model, tmp_path, images):
    report = quant_post_dynamic(fp32_model[0], str(tmp_path), generate_test_model=True)
    test_model = tmp_path / "test_model" / "model.pdmodel"
    assert all(t == FP32 for t in var_dtypes(read_program(str(test_model))).values())
    simulated = predict(str(test_model), str(tmp_path / "test_model" / "model.pdiparams"), images)
    deployed = predict(report["output"]["model"], report["output"]["params"], images)
    assert relative_l2(deployed, simulated) < 1e-5
    assert relative_l2(simulated, fp32_model[1]) > 1e-4


def test_quantize_dygraph_weights_exports_and_restores_train_mode(tmp_path, images):
    paddle.seed(1)
    model = SmallCNN()
    model.train()
    report = quantize_dygraph_weights(model, str(tmp_path / "out" / "small"), INPUT_SPEC, weight_bits=16)
    assert model.training and model.fc1.training
    assert sorted(os.listdir(tmp_path / "out")) == ["small.dynamic_quant.json", "small.pdiparams", "small.pdmodel"]
    assert len(report["quantized"]) == 5 and report["source"]["model"] == "dygraph SmallCNN"
    model.eval()
    reference = model(paddle.to_tensor(images)).numpy()
    logits = predict(str(tmp_path / "out" / "small.pdmodel"), str(tmp_path / "out" / "small.pdiparams"), images)
    assert relative_l2(logits, reference) < 2e-4


def test_model_path_prefix_and_file_names_are_accepted(fp32_model, tmp_path):
    directory = fp32_model[0]
    by_prefix = quant_post_dynamic(os.path.join(directory, "model"), str(tmp_path / "a"))
    by_name = quant_post_dynamic(directory, str(tmp_path / "b"), model_filename="model.pdmodel",
                                 params_filename="model.pdiparams", save_model_filename="w8.pdmodel")
    assert os.path.isfile(by_prefix["output"]["params"])
    assert by_name["output"]["model"].endswith("w8.pdmodel") and by_name["output"]["params"].endswith("w8.pdiparams")
    with open(by_prefix["output"]["params"], "rb") as a, open(by_name["output"]["params"], "rb") as b:
        assert a.read() == b.read()


# --------------------------------------------------------------------------------------- errors
def test_directory_without_a_model_says_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"\*\.pdmodel.*__model__.*notes\.txt"):
        quant_post_dynamic(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="PIR program.*DygraphOldIrGuard"):
        quant_post_dynamic(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="missing.pdmodel"):
        quant_post_dynamic(str(tmp_path / "missing"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="model.json looks like a PIR program"):
        quant_post_dynamic(str(tmp_path / "model"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits", [4, 32, True, "8"])
def test_weight_bits_other_than_8_or_16_are_rejected(fp32_model, tmp_path, bits):
    with pytest.raises(ValueError, match=rf"weight_bits={bits!r}.*use 8 or 16"):
        quant_post_dynamic(fp32_model[0], str(tmp_path / "out"), weight_bits=bits)
    assert not (tmp_path / "out").exists()


def test_unknown_op_types_list_the_supported_ones(fp32_model, tmp_path):
    with pytest.raises(ValueError, match=r"unsupported op types \['conv2d_transpose'\].*'matmul_v2'"):
        quant_post_dynamic(fp32_model[0], str(tmp_path), quantizable_op_type=["conv2d", "conv2d_transpose"])
    with pytest.raises(TypeError, match="list of op type names"):
        quant_post_dynamic(fp32_model[0], str(tmp_path), quantizable_op_type="conv2d")
    with pytest.raises(ValueError, match="weight_quantize_type='per_tensor'.*channel_wise_abs_max"):
        quant_post_dynamic(fp32_model[0], str(tmp_path), weight_quantize_type="per_tensor")
    assert set(SUPPORTED_OP_TYPES) == {"conv2d", "depthwise_conv2d", "mul", "matmul", "matmul_v2"}


def test_save_dir_that_is_a_file_or_unwritable_is_rejected(fp32_model, tmp_path):
    existing = tmp_path / "taken"
    existing.write_text("keep me")
    with pytest.raises(ValueError, match="existing file"):
        quant_post_dynamic(fp32_model[0], str(existing))
    assert existing.read_text() == "keep me"
    with pytest.raises(ValueError, match="not writable"):
        quant_post_dynamic(fp32_model[0], str(existing / "below"))
    if os.path.isdir("/proc/self") and not os.path.exists("/proc/qtrainer-test"):
        with pytest.raises(ValueError, match="not writable"):  # procfs refuses new directories, even to root
            quant_post_dynamic(fp32_model[0], "/proc/qtrainer-test/out")
    with pytest.raises(ValueError, match="overwrite the input model"):
        quant_post_dynamic(fp32_model[0], fp32_model[0])


def test_model_with_nothing_to_quantize_is_rejected_and_writes_nothing(tmp_path):
    export(NoWeights(), str(tmp_path / "fp32" / "model"), [paddle.static.InputSpec([None, 4], "float32", "x")])
    with pytest.raises(ValueError, match=r"nothing to quantize.*elementwise_add.*not a quantizable op"):
        quant_post_dynamic(str(tmp_path / "fp32"), str(tmp_path / "out" / "nested"))
    assert not (tmp_path / "out").exists()
    assert paddle.in_dynamic_mode()
