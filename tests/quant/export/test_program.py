"""Tests of qtrainer/quant/export/program.py: which convolutions feed a residual add."""
from __future__ import annotations

from qtrainer.quant.export.inference import ProgramOp
from qtrainer.quant.export.program import residual_conv_weights


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
