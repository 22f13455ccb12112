"""OpenVINO as a CPU runtime for the int8 export: convert, load, run, and see what really runs int8.

``write_openvino(prefix)`` converts the model at ``prefix`` (``export_quantized_model``'s legacy Paddle
model) with ``openvino.convert_model`` and writes ``prefix.xml`` + ``prefix.bin`` (OpenVINO IR)
atomically; ``convert_openvino(prefix, xml)`` writes them in place, e.g. into the export's staging
directory. An int8 model goes through our ONNX QDQ conversion (``qtrainer.quant.export.onnx``: batch
norms folded into the weight scales, one quantizer per tensor, quantized outputs before the residual
adds), not through OpenVINO's Paddle frontend: on the trained main-command MobileNetV1 (QAT) on an
AVX2 CPU the Paddle route agreed with the simulation on 93.7% of the test set's top-1 answers
(relative L2 0.13), the ONNX route on 98.8% (0.024), and on both CPU kinds the ONNX route runs
faster (README, Results). A float model is read from its ``.pdmodel``. The weights stay
int8 in the IR (an ``i8`` constant, a ``Convert`` and a per-channel ``Multiply``), so the ``.bin`` is
about a quarter of the float model's (MobileNetV1: 4.3 MB vs 16.9 MB). ``save_model`` is called with
``compress_to_fp16=False``: on an int8 model ``True`` changes nothing in OpenVINO 2026.4 (the
dequantization constants are kept fp32, the ``.bin`` is byte-for-byte the same size), but on a float
model (or a float layer of a partly int8 one) it rounds the weights to fp16, and a deployed model
should compute exactly what the simulation and Paddle Inference compute.

``load_openvino(xml, num_threads)`` compiles the IR for the CPU for single-stream latency
(``PERFORMANCE_HINT=LATENCY``: one stream; ``INFERENCE_NUM_THREADS``; ``INFERENCE_PRECISION_HINT=f32``
so that the float parts run fp32 as in the simulation and as in Paddle Inference, not bf16 on CPUs
with AMX/AVX512-BF16; no thread pinning, as Paddle Inference does not pin either).
``run_openvino`` runs numpy batches with the conventions of
``qtrainer.quant.export.inference.run_predictor``. ``runtime_precisions`` reads from the compiled
model the precision every convolution / fully-connected / matmul node runs in (OpenVINO decides
this itself: the int8 export only says where the quantization is); ``check_openvino`` compares the
OpenVINO outputs with the dygraph simulation with the export's own self-check metrics
(``qtrainer.quant.export.selfcheck``).

OpenVINO is an optional dependency (``pip install 'qtrainer[openvino]'``), imported only when one
of these functions is called.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections import Counter
from types import ModuleType
from typing import Any, Iterable, Sequence

import numpy as np

from qtrainer._checks import check_positive_int
from qtrainer._extras import require_extra
from qtrainer._io import fsync_directory, fsync_file
from qtrainer.quant.export.files import make_staging_dir, verify_export
from qtrainer.quant.export.inference import as_inputs, model_files, read_program_ops, run_batches
from qtrainer.quant.export.selfcheck import judge_runtime

__all__ = [
    "OPENVINO_SUFFIXES",
    "COMPUTE_LAYER_TYPES",
    "require_openvino",
    "convert_openvino",
    "write_openvino",
    "load_openvino",
    "run_openvino",
    "runtime_precisions",
    "check_openvino",
]

logger = logging.getLogger(__name__)

#: The files ``write_openvino`` writes next to the Paddle model (the ``.xml`` is the entry point).
OPENVINO_SUFFIXES = (".xml", ".bin")
#: Layer types of the CPU plugin's execution graph whose precision decides the speed (what we count).
COMPUTE_LAYER_TYPES = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
_CONVOLUTION_TYPES = ("Convolution", "GroupConvolution", "Deconvolution")
_INT8_PRECISIONS = ("u8", "i8")


def require_openvino() -> ModuleType:
    """The ``openvino`` module; ``ImportError`` naming the extra to install when it is missing."""
    return require_extra("openvino", "openvino", display="OpenVINO")


# ---------------------------------------------------------------------- writing the IR
def convert_openvino(model_prefix: str, xml_path: str, calibration: Sequence[Any] | None = None,
                     onnx_model: str | None = None) -> list[str]:
    """Convert the model at ``model_prefix`` to OpenVINO IR at ``xml_path`` (and its ``.bin``), in place.

    An int8 model is converted through ``convert_to_onnx`` (with ``calibration``, the batches that
    set the scale of the convolution outputs before a residual add; see the module docstring), or
    from ``onnx_model``, that conversion already written; a float one from its ``.pdmodel``. No
    staging: for a caller that writes into its own staging directory (the export's attempt
    directory, published with the rest); ``write_openvino`` is the safe version for a final
    location. The model files are checked against their export report
    first (``files.verify_export``: an interrupted export is refused). Returns ``[xml, bin]``.
    """
    ov = require_openvino()
    if not xml_path.endswith(".xml"):
        raise ValueError(f"xml_path={xml_path!r} must end with '.xml' (OpenVINO writes the weights beside it as .bin)")
    model, _ = model_files(model_prefix)  # both files there, and verified against their report
    int8 = any(op.type == "quantize_linear" for op in read_program_ops(model))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(xml_path))) as scratch:
        source = model
        if int8 and onnx_model is not None:
            source = onnx_model
        elif int8:
            from qtrainer.quant.export.onnx import convert_to_onnx

            source = os.path.join(scratch, "model.onnx")
            convert_to_onnx(model_prefix, source, calibration=calibration)
        if int8:
            source = _with_clamps_before_quantize(source, scratch)
        try:
            converted = ov.convert_model(source)
        except Exception as err:  # OpenVINO's conversion errors share no public base class
            raise RuntimeError(f"OpenVINO could not convert {source!r}: {err}") from err
        ov.save_model(converted, xml_path, compress_to_fp16=False)
    written = [xml_path, xml_path[: -len(".xml")] + ".bin"]
    for path in written:
        if not os.path.isfile(path):
            raise RuntimeError(f"openvino.save_model did not write {path!r}")
        fsync_file(path)
    return written


def _with_clamps_before_quantize(onnx_path: str, scratch: str) -> str:
    """``onnx_path``, or its copy in ``scratch`` with the code clamps before their quantize
    (``qtrainer.quant.export.code_clamps``: the form OpenVINO fuses)."""
    from qtrainer.quant.export.code_clamps import clamps_before_quantize
    from qtrainer.quant.export.onnx_runtime import require_onnx

    onnx = require_onnx()
    model = onnx.load(onnx_path)
    if not clamps_before_quantize(model):
        return onnx_path
    rewritten = os.path.join(scratch, "model.openvino.onnx")
    onnx.save(model, rewritten)
    return rewritten


def write_openvino(model_prefix: str, calibration: Sequence[Any] | None = None) -> list[str]:
    """Convert the model at ``model_prefix`` to ``model_prefix.xml`` + ``.bin``; return the written paths.

    As ``convert_openvino`` (an int8 model goes through the ONNX conversion, with ``calibration``).

    The IR is written (``convert_openvino``) in a staging directory next to the target and moved
    into place only when complete: the old ``.xml`` (the entry point) is removed first, then the
    ``.bin`` and the ``.xml`` are renamed, so a failure or a kill at any point leaves no
    half-written file and never a new ``.xml`` beside an old ``.bin``.
    """
    require_openvino()
    targets = [model_prefix + suffix for suffix in OPENVINO_SUFFIXES]
    parent = os.path.dirname(os.path.abspath(model_prefix))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"no Paddle inference model at prefix {model_prefix!r}: {parent!r} is not a directory")
    staging = make_staging_dir(parent, os.path.basename(model_prefix))
    try:
        staged = convert_openvino(model_prefix, os.path.join(staging, "model.xml"), calibration)
        with contextlib.suppress(FileNotFoundError):
            os.remove(targets[0])  # no old entry point beside a new .bin while the renames run
        os.replace(staged[1], targets[1])
        os.replace(staged[0], targets[0])
        fsync_directory(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("OpenVINO IR written: %s (%d bytes of weights)", targets[0], os.path.getsize(targets[1]))
    return targets


# ---------------------------------------------------------------------- running it
def load_openvino(xml_path: str, num_threads: int = 1, batch_size: int | None = None) -> Any:
    """An ``openvino.CompiledModel`` of ``xml_path`` on the CPU, set up for single-stream latency.

    ``num_threads`` is ``INFERENCE_NUM_THREADS``; see the module docstring for the other settings.
    ``batch_size`` fixes the first dimension of every input (default: as exported, free): a
    static shape runs a few percent faster on the CPU plugin (MobileNetV1 int8, batch 1: 5.4 vs
    5.8 ms). When the export report next to the model lists file hashes, they are verified first.
    """
    ov = require_openvino()
    check_positive_int("num_threads", num_threads)
    check_positive_int("batch_size", batch_size, allow_none=True)
    if not xml_path.endswith(".xml"):
        raise ValueError(f"xml_path={xml_path!r} must be an OpenVINO IR file ending with '.xml' (see write_openvino)")
    if not os.path.isfile(xml_path):
        raise FileNotFoundError(f"no OpenVINO model at {xml_path!r}; write it with write_openvino(prefix)")
    verify_export(xml_path[: -len(".xml")], required=())
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": num_threads,
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False,
    }
    core = ov.Core()
    model = core.read_model(xml_path)
    if batch_size is not None:
        shapes = {}
        for port in model.inputs:
            shape = port.get_partial_shape()
            if shape.rank.is_dynamic or shape.rank.get_length() == 0:
                raise ValueError(
                    f"batch_size={batch_size}: input {port.get_any_name()!r} has no batch dimension ({shape})"
                )
            shape[0] = batch_size
            shapes[port] = shape
        model.reshape(shapes)
    return core.compile_model(model, "CPU", config)


def run_openvino(compiled: Any, batches: Iterable[Any]) -> list[np.ndarray]:
    """Run every batch; return each output concatenated over the batches (along axis 0).

    A batch is one array or one array per model input, as for ``inference.run_predictor``.
    """
    request = compiled.create_infer_request()
    inputs, outputs = list(compiled.inputs), list(compiled.outputs)

    def run_one(batch: Any) -> list[np.ndarray]:
        arrays = as_inputs(batch)
        if len(arrays) != len(inputs):
            names = ", ".join(port.get_any_name() for port in inputs)
            raise ValueError(f"the model takes {len(inputs)} input(s) ({names}), got {len(arrays)} array(s)")
        result = request.infer(arrays)
        return [result[port] for port in outputs]

    return run_batches(run_one, batches, caller="run_openvino")


# ---------------------------------------------------------------------- what runs int8
def runtime_precisions(compiled: Any) -> dict[str, Any]:
    """The precision every compute node of the compiled model runs in, and a summary.

    Returns ``{"nodes": [{"name", "layer_type", "precision", "primitive"}, ...], "summary": {...}}``
    for the nodes whose layer type is in ``COMPUTE_LAYER_TYPES``; the summary has
    ``int8_convolutions``, ``float_convolutions``, ``int8_compute`` (every int8 compute node),
    ``float_compute`` and ``float_nodes`` (names of the compute nodes not running int8).
    """
    nodes = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = _rt_value(info, "layerType")
        if layer_type not in COMPUTE_LAYER_TYPES:
            continue
        nodes.append({
            "name": op.get_friendly_name(),
            "layer_type": layer_type,
            "precision": _rt_value(info, "runtimePrecision"),
            "primitive": _rt_value(info, "primitiveType"),
        })
    counts = Counter(
        ("conv" if n["layer_type"] in _CONVOLUTION_TYPES else "other", n["precision"] in _INT8_PRECISIONS)
        for n in nodes
    )
    int8 = [n for n in nodes if n["precision"] in _INT8_PRECISIONS]
    summary = {
        "int8_convolutions": counts[("conv", True)],
        "float_convolutions": counts[("conv", False)],
        "int8_compute": len(int8),
        "float_compute": len(nodes) - len(int8),
        "float_nodes": [n["name"] for n in nodes if n["precision"] not in _INT8_PRECISIONS],
    }
    return {"nodes": nodes, "summary": summary}


def _rt_value(info: Any, key: str) -> str | None:
    if key not in info:
        return None
    value = info[key]
    return value.astype(str) if hasattr(value, "astype") else str(value)


# ---------------------------------------------------------------------- the check
def check_openvino(
    xml_path: str,
    batches: Sequence[Any],
    reference: Sequence[np.ndarray],
    max_rel_l2: float,
    min_agreement: float,
    num_threads: int = 1,
    expected_int8_ops: int | None = None,
) -> dict[str, Any]:
    """The OpenVINO model at ``xml_path`` against ``reference`` (the dygraph simulation's outputs).

    The metrics and the verdict are the export self-check's (``selfcheck.compare_samples`` and
    ``judge``: relative L2 error, top-1 agreement over the samples with a clear top-1). Returns
    plain JSON data: the ``CheckResult`` fields (``passed``, ``rel_l2``, ``top1_agreement``,
    ``failures``, ...), ``runtime``/``openvino`` (version) and ``precisions`` (the summary of
    ``runtime_precisions``). With ``expected_int8_ops`` (the export's int8 layer calls,
    ``report.check.expected_int8_ops``), fewer int8 compute nodes in OpenVINO is listed in ``notes``
    and ``int8_ok`` is False.
    """
    ov = require_openvino()
    compiled = load_openvino(xml_path, num_threads)
    deployed = run_openvino(compiled, batches)
    precisions = runtime_precisions(compiled)["summary"]
    result = judge_runtime("OpenVINO", deployed, reference, precisions["int8_compute"], expected_int8_ops,
                           ", ".join(precisions["float_nodes"]), max_rel_l2, min_agreement)
    return {
        "runtime": "openvino",
        "openvino": ov.__version__,
        "model": xml_path,
        "num_threads": num_threads,
        **result.to_dict(),
        "int8_ok": result.int8_ok,
        "precisions": precisions,
    }
