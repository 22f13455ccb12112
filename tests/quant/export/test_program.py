"""Tests of qtrainer/quant/export/program.py and of the ops the export layers emit: which
convolutions feed a residual add, which unsigned inputs Paddle's conv + relu6 fusion marks itself."""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

import qtrainer.quant.export.orchestration as export_module
from qtrainer.quant.export import export_quantized_model
from qtrainer.quant.export.inference import ProgramOp, _new_predictor, make_config, read_program_ops
from qtrainer.quant.export.program import fused_unsigned_inputs, norms_after_convs, residual_conv_weights
from qtrainer.quant.transforms.wrap import quantize_model


def _op(type_, inputs, outputs):
    return ProgramOp(type=type_, inputs=inputs, outputs=outputs, attrs={})


def _conv(name, x, out):
    return [_op("dequantize_linear", {"X": [f"{name}.w8"]}, {"Y": [f"{name}.w"]}),
            _op("conv2d", {"Input": [x], "Filter": [f"{name}.w"]}, {"Output": [out]})]


def test_a_conv_whose_only_consumer_is_a_residual_add_is_found():
    ops = [_op("feed", {}, {"Out": ["x"]}), *_conv("a", "x", "ya"), _op("batch_norm", {"X": ["ya"]}, {"Y": ["yb"]}),
           *_conv("b", "x", "yc"), _op("elementwise_add", {"X": ["yb"], "Y": ["yc"]}, {"Out": ["z"]})]
    assert residual_conv_weights(ops) == {"a.w8", "b.w8"}


def test_a_bias_add_is_looked_through_and_a_shared_output_is_not_residual():
    ops = [_op("feed", {}, {"Out": ["x"]}), *_conv("a", "x", "ya"),
           _op("elementwise_add", {"X": ["ya"], "Y": ["bias"]}, {"Out": ["yb"]}),  # bias: not from the input
           _op("elementwise_add", {"X": ["yb"], "Y": ["x"]}, {"Out": ["z"]}),
           *_conv("c", "x", "yc"), _op("relu", {"X": ["yc"]}, {"Out": ["r"]}),
           _op("scale", {"X": ["yc"]}, {"Out": ["s"]})]
    assert residual_conv_weights(ops) == {"a.w8"}


def test_the_barrier_goes_after_the_batch_norm_that_alone_reads_the_conv():
    bn = lambda x, out, g: _op("batch_norm", {"X": [x], "Scale": [g]}, {"Y": [out]})  # noqa: E731
    ops = [_op("feed", {}, {"Out": ["x"]}),
           *_conv("a", "x", "ya"), bn("ya", "yb", "a.g"),  # conv -> bn
           *_conv("b", "x", "yc"), _op("scale", {"X": ["yc"]}, {"Out": ["ys"]}), bn("ys", "yd", "b.g"),  # barrier between
           _op("elementwise_add", {"X": ["yb"], "Y": ["yd"]}, {"Out": ["z"]}),
           *_conv("c", "z", "ye"), _op("elementwise_add", {"X": ["ye"], "Y": ["bias"]}, {"Out": ["yf"]}),
           bn("yf", "yg", "c.g"),  # a bias add in between: the barrier stays at the conv
           *_conv("d", "z", "yh"), bn("yh", "yi", "d.g"), _op("relu", {"X": ["yh"]}, {"Out": ["yj"]}),  # read twice
           _op("elementwise_add", {"X": ["yg"], "Y": ["yi"]}, {"Out": ["w"]})]
    weights = residual_conv_weights(ops)
    assert weights == {"a.w8", "b.w8", "c.w8"}
    assert norms_after_convs(ops, weights) == {"a.w8": "a.g", "b.w8": "b.g"}
    assert norms_after_convs(ops, {"a.w8"}) == {"a.w8": "a.g"}


# ---------------------------------------------------------------------- u8 inputs Paddle marks itself
def _chain(*steps):
    """``[(type, input, output)]`` -> ops; a ``quantize_linear`` gets the scale ``<output>.s``."""
    ops = [_op("feed", {}, {"Out": ["x"]})]
    for type_, x, out in steps:
        if type_ == "quantize_linear":
            ops.append(_op(type_, {"X": [x], "Scale": [f"{out}.s"]}, {"Y": [out]}))
        elif type_ in ("conv2d", "depthwise_conv2d"):
            ops.append(_op(type_, {"Input": [x], "Filter": ["w"]}, {"Output": [out]}))
        elif type_ == "batch_norm":
            ops.append(_op(type_, {"X": [x], "Scale": ["g"]}, {"Y": [out], "MeanOut": [f"{out}.m"]}))
        else:
            ops.append(_op(type_, {"X": [x]}, {"Out": [out]}))
    return ops


def test_a_quantized_conv_bn_relu6_output_is_found_and_other_unsigned_inputs_are_not():
    fused = _chain(("conv2d", "x", "c"), ("batch_norm", "c", "b"), ("relu6", "b", "r6"), ("relu", "r6", "r"),
                   ("quantize_linear", "r", "q1"),
                   ("depthwise_conv2d", "x", "d"), ("relu6", "d", "d6"), ("quantize_linear", "d6", "q2"),
                   ("conv2d", "x", "e"), ("batch_norm", "e", "eb"), ("relu", "eb", "er"),
                   ("quantize_linear", "er", "q3"))
    assert fused_unsigned_inputs(fused) == {"q1.s", "q2.s", "q3.s"}
    kept = _chain(("conv2d", "x", "c"), ("pool2d", "c", "p"), ("relu6", "p", "p6"), ("relu", "p6", "pr"),
                  ("quantize_linear", "pr", "q1"),  # a standalone relu6 (after a pool)
                  ("conv2d", "x", "e"), ("elementwise_add", "e", "ea"), ("relu6", "ea", "e6"), ("relu", "e6", "er"),
                  ("quantize_linear", "er", "q2"),  # a bias add in between: Paddle does not fuse it here
                  ("conv2d", "x", "f"), ("relu6", "f", "f6"), ("clip", "f6", "fc"), ("relu", "fc", "fr"),
                  ("quantize_linear", "fr", "q3"),  # an explicit clip after the activation
                  ("conv2d", "x", "g"), ("batch_norm", "g", "gb"), ("relu6", "gb", "g6"), ("relu", "g6", "gr"),
                  ("quantize_linear", "gr", "q4"), ("scale", "gb", "gs"),  # the bn output used twice
                  ("conv2d", "x", "h"), ("relu6", "h", "h6"), ("quantize_linear", "h6", "q5"), ("scale", "h", "hs"))
    assert fused_unsigned_inputs(kept) == set()


class _Relu6Net(nn.Layer):
    """conv -> bn -> relu6 -> conv2 (u8 from the fused conv) -> relu -> max pool -> conv3 (a pool
    output: keeps the no-op relu) -> max pool -> relu6 (standalone) -> conv4 (keeps it too) -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2D(3, 8, 3, padding=1, bias_attr=False), nn.BatchNorm2D(8)
        self.conv2 = nn.Conv2D(8, 8, 3, padding=1, bias_attr=False)
        self.conv3 = nn.Conv2D(8, 8, 3, padding=1, bias_attr=False)
        self.conv4 = nn.Conv2D(8, 8, 3, padding=1, bias_attr=False)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv1(x)))
        y = F.max_pool2d(F.relu(self.conv2(y)), 2)
        y = F.relu6(F.max_pool2d(self.conv3(y), 2))
        return self.fc(paddle.flatten(self.conv4(y), 1))


def _relu6_net() -> nn.Layer:
    paddle.seed(0)
    net = _Relu6Net()
    with paddle.no_grad():  # batch-norm statistics that are not the identity
        net.bn1._mean.set_value(paddle.full([8], 0.1))
        net.bn1._variance.set_value(paddle.full([8], 0.05))
    quantize_model(net)
    net.train()
    net.bn1.eval()
    with paddle.no_grad():  # observed scales (as a short QAT run has them)
        for seed in range(3):
            net(paddle.to_tensor(_unsigned_batch(seed)))
    net.eval()
    return net


def _unsigned_batch(seed: int, n: int = 16) -> np.ndarray:
    """Image-like inputs in [0, 1): every layer input is u8, so nothing here depends on VNNI (s8 inputs do)."""
    return np.random.RandomState(seed).rand(n, 3, 16, 16).astype("float32")


def _optimized_program(prefix: str) -> list:
    directory = tempfile.mkdtemp()
    try:
        predictor = _new_predictor(make_config(prefix, int8=True, optim_cache_dir=directory), quiet=True)
        del predictor
        return read_program_ops(os.path.join(directory, "_optimized.pdmodel"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_conv_bn_relu6_writes_u8_without_the_no_op_relu(tmp_path, monkeypatch):
    """Paddle fuses conv + bn + relu6 and marks the fused conv's output unsigned itself: no no-op
    relu before its quantize, so the fused conv writes int8 for the next conv (not fp32 for a
    separate relu and quantize). After a pool and after a standalone relu6 the relu stays. The
    deployed numbers are those of the export with every relu (the same u8 codes)."""
    net = _relu6_net()
    options = dict(sample_inputs=[_unsigned_batch(7), _unsigned_batch(8)], fallback=False, on_failure="write",
                   clip_activations=False)  # the relus only (an explicit clip always keeps its relu)
    report = export_quantized_model(net, str(tmp_path / "new"), **options)
    saved = read_program_ops(str(tmp_path / "new.pdmodel"))
    # conv2's own relu and the no-ops that stay: on the image input, after the pool, after the relu6
    assert sum(op.type == "relu" for op in saved) == 4
    ops = _optimized_program(str(tmp_path / "new"))
    producer = {name: op for op in ops for names in op.outputs.values() for name in names}
    consumers = {}
    for op in ops:
        for name in (n for names in op.inputs.values() for n in names):
            consumers.setdefault(name, []).append(op)
    convs = [op for op in ops if op.type == "fused_conv2d"]
    first = convs[0]
    assert first.attrs.get("fuse_activation") == "relu6" and first.attrs.get("mkldnn_data_type") == "int8"
    assert not first.attrs.get("force_fp32_output")  # int8 -> int8
    assert [c.type for c in consumers[first.outputs["Output"][0]]] == ["fused_conv2d"]
    relus = [op for op in ops if op.type == "relu"]
    assert sorted(producer[op.inputs["X"][0]].type for op in relus) == ["feed", "pool2d", "relu6"]
    assert sum(op.type == "relu6" for op in ops) == 1  # the standalone one
    assert sum(op.attrs.get("mkldnn_data_type") == "int8" for op in convs) == 5 == len(report.int8_layers)

    monkeypatch.setattr(export_module, "fused_unsigned_inputs", lambda ops: set())  # a relu everywhere
    before = export_quantized_model(net, str(tmp_path / "old"), **options)
    old_ops = _optimized_program(str(tmp_path / "old"))
    old_first = [op for op in old_ops if op.type == "fused_conv2d"][0]
    assert old_first.attrs.get("force_fp32_output") and sum(op.type == "relu" for op in old_ops) == 4
    assert report.check.rel_l2 <= before.check.rel_l2 * 1.01 + 1e-6 and report.check.rel_l2 < 0.05
    assert report.check.top1_agreement >= before.check.top1_agreement
    assert report.check.int8_ops == before.check.int8_ops
