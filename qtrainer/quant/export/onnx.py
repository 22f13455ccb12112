"""ONNX as a deployment format of the int8 export: convert, run with onnxruntime, see what runs int8.

``convert_to_onnx(prefix, onnx_path)`` converts ``prefix.pdmodel`` + ``prefix.pdiparams`` (the legacy
Paddle program written by ``export_quantized_model``) into an ONNX QDQ model (``QuantizeLinear`` /
``DequantizeLinear`` around every int8 layer, int8 weights kept int8) with our own converter,
``onnx_convert`` (paddle2onnx aborts the process on these quantized programs). The file is written
under a temporary name and renamed into place, so there is never a half-written model.

``load_onnxruntime`` / ``run_onnxruntime`` / ``onnxruntime_int8_nodes`` / ``check_onnx`` run it on
onnxruntime's CPU provider and compare it with the simulation (``onnx_runtime``).

onnx and onnxruntime are optional (``pip install 'qtrainer[onnx]'``), imported only when used.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from qtrainer._io import atomic_open
from qtrainer.quant.export.inference import read_params, read_program_ops
from qtrainer.quant.export.onnx_runtime import (
    check_onnx,
    load_onnxruntime,
    onnxruntime_int8_nodes,
    require_onnx,
    require_onnxruntime,
    run_onnxruntime,
)

__all__ = [
    "MIN_OPSET",
    "require_onnx",
    "require_onnxruntime",
    "convert_to_onnx",
    "onnx_bias_shifts",
    "load_onnxruntime",
    "run_onnxruntime",
    "onnxruntime_int8_nodes",
    "check_onnx",
]

logger = logging.getLogger(__name__)

#: Per-channel ``DequantizeLinear`` (the int8 weights) needs opset 13.
MIN_OPSET = 13


def _program_vars(pdmodel: str) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Shapes and numpy dtypes of the variables of block 0 (what ``read_program_ops`` leaves out)."""
    from paddle.base.proto import framework_pb2

    from qtrainer.quant.export.inference import _NUMPY_DTYPES

    desc = framework_pb2.ProgramDesc()
    with open(pdmodel, "rb") as handle:
        desc.ParseFromString(handle.read())
    shapes, dtypes = {}, {}
    for var in desc.blocks[0].vars:
        if not var.type.HasField("dense_tensor"):
            continue
        tensor = var.type.dense_tensor.tensor
        shapes[var.name] = [int(d) for d in tensor.dims]
        name = framework_pb2.VarType.Type.Name(tensor.data_type)
        dtypes[var.name] = _NUMPY_DTYPES.get(name, np.float32)
    return shapes, dtypes


def onnx_bias_shifts(model_prefix: str) -> dict[str, np.ndarray]:
    """What ``convert_to_onnx`` would round off each int8 convolution's folded bias: per parameter
    of the Paddle program (a batch norm's beta, or the bias added), the vector that, added to it,
    puts that bias on the int32 grid ``x_scale * w_scale`` onnxruntime computes it on."""
    require_onnx()
    from qtrainer.quant.export.onnx_convert import ProgramToOnnx

    converter = ProgramToOnnx(*_read_int8_program(model_prefix))
    converter.build()
    return dict(converter.report.bias_shifts)


def _read_int8_program(model_prefix: str) -> tuple[list, dict[str, np.ndarray], dict, dict]:
    """``(ops, params, shapes, dtypes)`` of the int8 Paddle program at ``model_prefix`` (``ValueError``
    for a program without quantize_linear ops)."""
    params = read_params(model_prefix)  # verifies the files against their export report
    pdmodel = model_prefix + ".pdmodel"
    ops = read_program_ops(pdmodel)
    if not any(op.type == "quantize_linear" for op in ops):
        raise ValueError(
            f"{pdmodel!r} has no quantize_linear op: the model was never quantized (convert_to_onnx takes "
            "the int8 export of export_quantized_model; export a float model with paddle.onnx.export)"
        )
    shapes, dtypes = _program_vars(pdmodel)
    return ops, params, shapes, dtypes


def convert_to_onnx(model_prefix: str, onnx_path: str, opset: int = MIN_OPSET,
                    float_outputs: str = "int8", calibration: Sequence[Any] | None = None) -> dict[str, Any]:
    """Convert the int8 Paddle model at ``model_prefix`` to an ONNX QDQ model at ``onnx_path``.

    Args:
        model_prefix: the prefix given to ``export_quantized_model`` (``.pdmodel`` / ``.pdiparams``).
        onnx_path: the ``.onnx`` file to write (replaced atomically; never half-written).
        opset: the ONNX opset, at least ``MIN_OPSET`` (13: per-channel DequantizeLinear).
        float_outputs: the int8 convolutions whose output the Paddle program keeps float (before a
            residual add, an average pool): ``'int8'`` (default) quantizes it s8 on the threshold of
            the next quantized tensor so that onnxruntime runs them as ``QLinearConv``; ``'float'``
            leaves them as float convolutions on the dequantized int8 weights.
        calibration: batches (as for ``run_onnxruntime``, e.g. the export's sample inputs) on which
            the abs-max of those float outputs is measured, for their s8 scale instead of the next
            tensor's threshold (SmallResNet on Fashion-MNIST, rel. L2 vs the simulation: 0.027 without,
            0.011 with; only with ``float_outputs='int8'``).

    Returns:
        ``{"path", "opset", "nodes": {ONNX op: count}, "int8_layers", "quantized_outputs" (conv
        output -> why it got a Q), "float_outputs" (int8 convs left float), "gemm_float_outputs"
        (int8 Linears with a float output: QGemm), "folded_batch_norms"}``.
    """
    onnx = require_onnx()
    from qtrainer.quant.export.onnx_convert import FLOAT_OUTPUTS, ProgramToOnnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset={opset!r}: use an int from {MIN_OPSET} (per-channel DequantizeLinear, the int8 weights) "
            f"to {newest} (the newest this onnx {onnx.__version__} knows)"
        )
    if float_outputs not in FLOAT_OUTPUTS:
        raise ValueError(f"float_outputs={float_outputs!r} is not valid: use one of {FLOAT_OUTPUTS}")
    if os.path.isdir(onnx_path):
        raise ValueError(f"onnx_path={onnx_path!r} is a directory; give the path of the .onnx file to write")
    ops, params, shapes, dtypes = _read_int8_program(model_prefix)
    thresholds = None
    if calibration is not None and float_outputs == "int8":
        thresholds = _calibrate(onnx, ProgramToOnnx(ops, params, shapes, dtypes, "float"), opset, calibration)
    converter = ProgramToOnnx(ops, params, shapes, dtypes, float_outputs, thresholds)
    converter.build()
    model = _make_model(onnx, converter, opset)
    onnx.checker.check_model(model)
    with atomic_open(onnx_path, "wb", owner="convert_to_onnx") as handle:
        handle.write(model.SerializeToString())
    report = converter.report
    result = {
        "path": onnx_path,
        "opset": opset,
        "nodes": dict(Counter(n.op_type for n in model.graph.node)),
        "int8_layers": len(report.int8_convs),
        "quantized_outputs": dict(report.quantized_outputs),
        "float_outputs": list(report.float_outputs),
        "gemm_float_outputs": list(report.gemm_float_outputs),
        "folded_batch_norms": report.folded_batch_norms,
        "merged_quantizers": report.merged_quantizers,
    }
    logger.info("ONNX model written: %s (%d int8 layers, %d with a float output)", onnx_path,
                result["int8_layers"], len(result["float_outputs"]))
    return result


def _calibrate(onnx: ModuleType, converter: Any, opset: int, batches: Sequence[Any]) -> dict[str, float]:
    """Abs-max of the int8 convolutions' float outputs on ``batches`` (a float-output model run once)."""
    converter.build()
    names = list(converter.report.float_outputs)
    if not names:
        return {}
    extra = [onnx.helper.make_tensor_value_info(
        n, onnx.TensorProto.FLOAT, [d if d >= 0 else None for d in converter.shapes.get(n, [])] or None) for n in names]
    model = _make_model(onnx, converter, opset, extra)
    session = require_onnxruntime().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    first = len(model.graph.output) - len(names)
    values = run_onnxruntime(session, batches)[first:]
    return {name: float(np.max(np.abs(v))) for name, v in zip(names, values) if np.max(np.abs(v)) > 0}


def _make_model(onnx: ModuleType, converter: Any, opset: int, extra_outputs: Sequence[Any] = ()) -> Any:
    """The ``ModelProto``: the converter's nodes without the ones no output needs, its initializers."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    outputs = [info for _, info in sorted(converter.outputs, key=lambda item: item[0])] + list(extra_outputs)
    needed = {info.name for info in outputs}
    kept = []
    for node in reversed(converter.nodes):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(n for n in node.input if n)
    kept.reverse()
    initializers = [numpy_helper.from_array(np.asarray(v), k) for k, v in converter.inits.items() if k in needed]
    inputs = [info for _, info in sorted(converter.inputs, key=lambda item: item[0])]
    graph = helper.make_graph(kept, "qtrainer_int8", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="qtrainer",
                             ir_version=helper.find_min_ir_version_for(opsets))
