"""Paddle Inference helpers: CPU predictors (float or oneDNN int8), numpy batches, int8 op counts.

``create_predictor(prefix, int8=True)`` loads ``prefix.pdmodel`` + ``prefix.pdiparams`` with oneDNN
(``enable_mkldnn()``) and, for ``int8=True``, ``enable_mkldnn_int8()``: Paddle's passes then turn the
``quantize_linear``/``dequantize_linear`` pairs written by ``qtrainer.quant.export`` into int8
oneDNN kernels. ``run_predictor`` feeds numpy batches and returns the outputs.

Every loader here first checks the model files against their export report, when there is one
(``qtrainer.quant.export.files.verify_export``): the SHA-256 recorded by the export must match, so an
export interrupted between its renames (a new ``.pdmodel`` with an old ``.pdiparams``) is refused
with ``ExportIntegrityError`` (a ``ValueError``) instead of computing another model's outputs.

How we know a model really runs int8: ``load_int8_predictor`` also asks Paddle to save the program
it optimized (``enable_save_optim_model``) and counts the compute ops (convolutions, fc, matmul)
whose ``mkldnn_data_type`` attribute is ``'int8'`` (``read_program_ops`` parses the saved
``.pdmodel`` protobuf directly, so no static mode is switched on). These are the same numbers as the
"quantized N conv2d ops" lines of Paddle's log, without parsing the log.

Nothing here changes process-wide state: a predictor's settings live in its ``Config``. With
``quiet=True`` (default) Paddle's pass log, which native code writes to file descriptor 2, is
redirected to this module's debug log while a predictor is built (fd 2 is restored afterwards).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from qtrainer._checks import check_positive_int
from qtrainer.quant.export.files import verify_export

__all__ = [
    "INT8_COMPUTE_OPS",
    "ProgramOp",
    "make_config",
    "create_predictor",
    "load_int8_predictor",
    "int8_graph_summary",
    "model_files",
    "as_inputs",
    "run_batches",
    "run_predictor",
    "predict",
    "read_program_ops",
    "read_params",
    "int8_op_counts",
]

logger = logging.getLogger(__name__)

#: Op types whose int8 execution is what makes a quantized model fast (what we count).
INT8_COMPUTE_OPS = (
    "conv2d",
    "depthwise_conv2d",
    "fused_conv2d",
    "fc",
    "matmul",
    "matmul_v2",
    "fused_matmul",
)
_OPTIMIZED_NAME = "_optimized"


def model_files(prefix: str) -> tuple[str, str]:
    """The model and params files at ``prefix``, verified against their export report if it has one
    (``qtrainer.quant.export.files.verify_export``: an interrupted or mixed export is refused)."""
    model, params = prefix + ".pdmodel", prefix + ".pdiparams"
    missing = [p for p in (model, params) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"no Paddle inference model at prefix {prefix!r}: missing {', '.join(missing)} "
            "(pass the path given to paddle.jit.save / export_quantized_model, without extension)"
        )
    verify_export(prefix)
    return model, params


def make_config(
    prefix: str,
    *,
    int8: bool = True,
    mkldnn: bool = True,
    num_threads: int = 1,
    ir_optim: bool = True,
    optim_cache_dir: str | None = None,
    quiet: bool = True,
):
    """A ``paddle.inference.Config`` for a CPU predictor of ``prefix.pdmodel``/``.pdiparams``.

    ``int8`` needs ``mkldnn``; ``optim_cache_dir`` makes Paddle save the optimized program there
    (``_optimized.pdmodel``); ``quiet`` turns Paddle's pass log off for this predictor.
    """
    from paddle import inference

    if int8 and not mkldnn:
        raise ValueError("int8=True needs mkldnn=True: Paddle's CPU int8 kernels are oneDNN kernels")
    check_positive_int("num_threads", num_threads)
    model, params = model_files(prefix)
    config = inference.Config(model, params)
    config.disable_gpu()
    config.set_cpu_math_library_num_threads(num_threads)
    config.switch_ir_optim(ir_optim)
    if mkldnn:
        config.enable_mkldnn()
        if int8:
            config.enable_mkldnn_int8()
    if optim_cache_dir is not None:
        config.set_optim_cache_dir(optim_cache_dir)
        config.enable_save_optim_model(True)
    if quiet:
        config.disable_glog_info()
    return config


@contextlib.contextmanager
def _stderr_to_debug_log() -> Iterator[None]:
    """Send what native code writes to file descriptor 2 meanwhile to this module's debug log.

    Paddle's pass log ("quantized N conv2d ops", ...) is written by glog straight to fd 2, and
    ``Config.disable_glog_info`` silences only part of it; ``sys.stderr`` redirection does not see it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                logger.debug("Paddle Inference log:\n%s", text)


def _new_predictor(config, quiet: bool):
    from paddle import inference

    if not quiet:
        return inference.create_predictor(config)
    with _stderr_to_debug_log():
        return inference.create_predictor(config)


def create_predictor(
    prefix: str,
    *,
    int8: bool = True,
    mkldnn: bool = True,
    num_threads: int = 1,
    ir_optim: bool = True,
    quiet: bool = True,
):
    """A Paddle Inference CPU predictor: oneDNN fp32 (``int8=False``) or oneDNN int8 (default)."""
    config = make_config(
        prefix, int8=int8, mkldnn=mkldnn, num_threads=num_threads, ir_optim=ir_optim, quiet=quiet
    )
    return _new_predictor(config, quiet)


def load_int8_predictor(prefix: str, num_threads: int = 1, graph: dict | None = None) -> tuple[Any, Counter]:
    """An oneDNN int8 predictor and ``{op type: count}`` of the compute ops it runs in int8.

    The counts come from the optimized program Paddle saved while building the predictor (in a
    temporary directory, removed afterwards); a ``graph`` dict given is filled with its
    ``int8_graph_summary``.
    """
    directory = tempfile.mkdtemp(prefix="qtrainer-optim-")
    try:
        config = make_config(prefix, int8=True, num_threads=num_threads, optim_cache_dir=directory)
        predictor = _new_predictor(config, quiet=True)
        optimized = os.path.join(directory, _OPTIMIZED_NAME + ".pdmodel")
        if not os.path.isfile(optimized):
            raise RuntimeError(
                f"Paddle Inference did not save its optimized program for {prefix!r} "
                f"(expected {optimized}); cannot count the int8 ops"
            )
        ops = read_program_ops(optimized)
        counts = int8_op_counts(ops)
        if graph is not None:
            graph.update(int8_graph_summary(ops))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return predictor, counts


def as_inputs(batch: Any) -> list[np.ndarray]:
    """One batch as the list of its input arrays (a single array is one input)."""
    items = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    return [np.ascontiguousarray(np.asarray(item)) for item in items]


def predict(predictor: Any, batch: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run one batch (an array, or one array per model input) and return every output."""
    inputs = as_inputs(batch)
    names = predictor.get_input_names()
    if len(inputs) != len(names):
        raise ValueError(
            f"the predictor takes {len(names)} input(s) ({', '.join(names)}), got {len(inputs)} array(s)"
        )
    for name, array in zip(names, inputs):
        handle = predictor.get_input_handle(name)
        handle.reshape(list(array.shape))
        handle.copy_from_cpu(array)
    predictor.run()
    return [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]


def run_predictor(predictor: Any, batches: Iterable[Any]) -> list[np.ndarray]:
    """Run every batch; return each output concatenated over the batches (along axis 0)."""
    return run_batches(lambda batch: predict(predictor, batch), batches)


def run_batches(run_one: Callable[[Any], Sequence[np.ndarray]], batches: Iterable[Any],
                caller: str | None = None) -> list[np.ndarray]:
    """Each output of ``run_one(batch)`` concatenated over ``batches`` (along axis 0; scalars stacked).

    The one loop of every runtime's ``run_*``. No batch gives ``[]``, or, with ``caller``, a
    ``ValueError`` saying that ``caller`` needs at least one.
    """
    per_output: list[list[np.ndarray]] = []
    for batch in batches:
        outputs = run_one(batch)
        if not per_output:
            per_output = [[] for _ in outputs]
        for store, out in zip(per_output, outputs):
            store.append(np.asarray(out))
    if not per_output and caller is not None:
        raise ValueError(f"{caller} needs at least one batch")
    return [np.concatenate(store) if store[0].ndim else np.stack(store) for store in per_output]


# ---------------------------------------------------------------------- reading a .pdmodel
@dataclass
class ProgramOp:
    """One op of a saved legacy program: type, input/output variable names, attributes."""

    type: str
    inputs: dict[str, list[str]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


_SCALAR_ATTR_FIELDS = ("i", "f", "b", "s", "l")
_LIST_ATTR_FIELDS = ("ints", "floats", "bools", "strings", "longs")


def _attr_value(attr: Any) -> Any:
    for name in _SCALAR_ATTR_FIELDS:
        if attr.HasField(name):
            return getattr(attr, name)
    for name in _LIST_ATTR_FIELDS:
        values = getattr(attr, name, None)
        if values is not None and len(values):
            return list(values)
    return None


def read_program_ops(pdmodel_path: str) -> list[ProgramOp]:
    """The ops of block 0 of a legacy ``.pdmodel`` file, parsed with Paddle's protobuf classes."""
    from paddle.base.proto import framework_pb2

    desc = framework_pb2.ProgramDesc()
    with open(pdmodel_path, "rb") as handle:
        data = handle.read()
    try:
        desc.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError is not exported under a stable name
        raise ValueError(f"{pdmodel_path!r} is not a legacy Paddle program (.pdmodel): {err}") from err
    ops = []
    for op in desc.blocks[0].ops:
        ops.append(
            ProgramOp(
                type=op.type,
                inputs={v.parameter: list(v.arguments) for v in op.inputs if v.arguments},
                outputs={v.parameter: list(v.arguments) for v in op.outputs if v.arguments},
                attrs={a.name: _attr_value(a) for a in op.attrs},
            )
        )
    return ops


def int8_op_counts(ops: Iterable[ProgramOp]) -> Counter:
    """``{op type: count}`` of the compute ops (``INT8_COMPUTE_OPS``) marked to run in int8."""
    return Counter(
        op.type
        for op in ops
        if op.type in INT8_COMPUTE_OPS and op.attrs.get("mkldnn_data_type") == "int8"
    )


_CONV_TYPES = ("fused_conv2d", "conv2d", "depthwise_conv2d")
_GLUE_TYPES = ("quantize", "dequantize", "requantize", "relu", "scale", "batch_norm", "elementwise_add")


def int8_graph_summary(ops: Iterable[ProgramOp]) -> dict[str, int]:
    """How much of an optimized program chains int8: convolutions by output, and the glue ops.

    ``conv int8->int8`` write int8 for the next int8 op, ``conv int8->fp32`` write fp32 (a
    residual barrier, a float consumer or the last layer), ``conv fp32`` run in float; the
    glue counts (``quantize``, ``dequantize``, fp32 ``elementwise_add``, unfolded ``batch_norm``,
    ``scale``, ``relu``) are the ops a fully fused graph no longer has. Convolutions fused with a
    residual add are also counted as ``conv +residual``.
    """
    summary = {"conv int8->int8": 0, "conv int8->fp32": 0, "conv fp32": 0, "conv +residual": 0}
    summary.update({name: 0 for name in _GLUE_TYPES})
    for op in ops:
        if op.type in _CONV_TYPES:
            if op.attrs.get("mkldnn_data_type") != "int8":
                summary["conv fp32"] += 1
            elif op.attrs.get("force_fp32_output"):
                summary["conv int8->fp32"] += 1
            else:
                summary["conv int8->int8"] += 1
            if op.attrs.get("fuse_residual_connection"):
                summary["conv +residual"] += 1
        elif op.type in _GLUE_TYPES:
            summary[op.type] += 1
    return summary


_NUMPY_DTYPES = {
    "FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8, "UINT8": np.uint8,
    "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
}


def read_params(prefix: str) -> dict[str, np.ndarray]:
    """The persistable tensors of ``prefix.pdiparams`` by name, read without loading Paddle's executor.

    ``paddle.jit.save`` writes them with ``save_combine``: in sorted name order, each one as a
    version, its LoD, a version, a ``TensorDesc`` protobuf and the raw data.
    """
    import struct

    from paddle.base.proto import framework_pb2

    model, params = model_files(prefix)
    desc = framework_pb2.ProgramDesc()
    with open(model, "rb") as handle:
        desc.ParseFromString(handle.read())
    names = sorted(
        v.name for v in desc.blocks[0].vars if v.persistable and v.name not in ("feed", "fetch")
    )
    with open(params, "rb") as handle:
        data = handle.read()
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name in names:
        offset += 4  # tensor version
        (lod_levels,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        for _ in range(lod_levels):
            (size,) = struct.unpack_from("<Q", data, offset)
            offset += 8 + size
        offset += 4  # tensor desc version
        (size,) = struct.unpack_from("<i", data, offset)
        offset += 4
        tensor = framework_pb2.VarType.TensorDesc()
        tensor.ParseFromString(data[offset:offset + size])
        offset += size
        dtype = np.dtype(_NUMPY_DTYPES[framework_pb2.VarType.Type.Name(tensor.data_type)])
        count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(list(tensor.dims))
        offset += count * dtype.itemsize
    if offset != len(data):
        raise ValueError(
            f"{params!r}: read {offset} of {len(data)} bytes; not a save_combine file of {model!r}"
        )
    return out
