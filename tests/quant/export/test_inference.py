"""Paddle Inference helpers: predictors, numpy batches, reading saved programs, int8 op counts."""
from __future__ import annotations

import os

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer.quant.export.inference import (
    create_predictor,
    int8_op_counts,
    load_int8_predictor,
    make_config,
    predict,
    read_params,
    read_program_ops,
    run_predictor,
)
from qtrainer.quant.methods.qat import QAT

SPEC = [paddle.static.InputSpec([None, 2, 8, 8], "float32", "x")]


def _net() -> nn.Layer:
    paddle.seed(0)
    return nn.Sequential(
        nn.Conv2D(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2D(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    )


def _save_float(net: nn.Layer, prefix: str) -> None:
    net.eval()
    with paddle.pir_utils.DygraphOldIrGuard():
        paddle.jit.save(net, prefix, input_spec=SPEC)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).rand(n, 2, 8, 8).astype("float32")


@pytest.fixture
def float_model(tmp_path):
    net = _net()
    prefix = str(tmp_path / "float")
    _save_float(net, prefix)
    return net, prefix


@pytest.fixture
def int8_model(tmp_path):
    net = _net()
    QAT().quantize(net)
    net.train()
    with paddle.no_grad():
        for seed in range(3):
            net(paddle.to_tensor(_images(8, seed)))
    prefix = str(tmp_path / "int8")
    from qtrainer.quant.export import export_quantized_model

    export_quantized_model(net, prefix, sample_inputs=[_images(16)], check=False)
    return net, prefix


@pytest.mark.parametrize("mkldnn", [False, True])
def test_float_predictor_matches_dygraph(float_model, mkldnn):
    net, prefix = float_model
    batches = [_images(3, 1), _images(5, 2)]
    predictor = create_predictor(prefix, int8=False, mkldnn=mkldnn)
    [out] = run_predictor(predictor, batches)
    with paddle.no_grad():
        ref = net(paddle.to_tensor(np.concatenate(batches))).numpy()
    assert out.shape == (8, 5)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_predict_accepts_one_array_or_one_per_input(float_model):
    _, prefix = float_model
    predictor = create_predictor(prefix, int8=False)
    x = _images(2)
    [a] = predict(predictor, x)
    [b] = predict(predictor, [x])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="takes 1 input"):
        predict(predictor, [x, x])


def test_read_program_ops_of_a_float_model(float_model):
    _, prefix = float_model
    ops = read_program_ops(prefix + ".pdmodel")
    types = [op.type for op in ops]
    assert types.count("conv2d") == 2
    assert "matmul_v2" in types
    conv = next(op for op in ops if op.type == "conv2d")
    assert conv.attrs["strides"] == [1, 1]
    assert set(conv.inputs) >= {"Input", "Filter"}
    assert int8_op_counts(ops) == {}


def test_read_program_ops_rejects_garbage(tmp_path):
    path = tmp_path / "bad.pdmodel"
    path.write_bytes(b"\xff\xfe not a program")
    with pytest.raises(ValueError, match="not a legacy Paddle program"):
        read_program_ops(str(path))


def test_int8_export_runs_int8_kernels(int8_model):
    """Every quantized layer (two convs + the Linear as a 1x1 conv) runs as an int8 oneDNN op."""
    net, prefix = int8_model
    predictor, counts = load_int8_predictor(prefix)
    assert sum(counts.values()) == 3
    assert set(counts) <= {"conv2d", "fused_conv2d"}
    # the float predictor of the same files runs no int8 op and both give close outputs
    x = _images(4, 7)
    [int8_out] = predict(predictor, x)
    [fp32_out] = predict(create_predictor(prefix, int8=False), x)
    assert np.linalg.norm(int8_out - fp32_out) / np.linalg.norm(fp32_out) < 0.05


def test_read_params_gives_int8_weights(int8_model):
    _, prefix = int8_model
    params = read_params(prefix)
    int8 = {k: v for k, v in params.items() if v.dtype == np.int8}
    assert sorted(v.shape for v in int8.values()) == [(4, 2, 3, 3), (4, 4, 3, 3), (5, 256, 1, 1)]
    for weight in int8.values():
        assert np.abs(weight.astype(int)).max() == 127  # abs-max channel-wise: a code reaches 127


def test_quiet_predictor_keeps_pass_log_off_stderr(int8_model, capfd):
    _, prefix = int8_model
    capfd.readouterr()
    load_int8_predictor(prefix)
    err = capfd.readouterr().err
    assert "quantized" not in err and "Running IR pass" not in err
    os.write(2, b"fd2-restored\n")  # file descriptor 2 works again
    assert "fd2-restored" in capfd.readouterr().err


def test_config_errors(float_model, tmp_path):
    _, prefix = float_model
    with pytest.raises(ValueError, match="int8=True needs mkldnn=True"):
        make_config(prefix, int8=True, mkldnn=False)
    with pytest.raises(ValueError, match="num_threads=0"):
        make_config(prefix, num_threads=0)
    with pytest.raises(FileNotFoundError, match="missing"):
        make_config(str(tmp_path / "nothing"))
