"""onnxruntime as a CPU runtime for the ONNX int8 export: load, run, and see what really runs int8.

``load_onnxruntime(path, num_threads)`` is an ``InferenceSession`` on the CPU provider (all graph
optimizations, ``intra_op_num_threads``). ``run_onnxruntime`` runs numpy batches with the conventions
of ``qtrainer.quant.export.inference.run_predictor``. ``onnxruntime_int8_nodes`` counts the int8
kernels of the graph onnxruntime optimized (``QLinearConv``, ``QGemm``, ...), ``check_onnx`` compares
the outputs with the dygraph simulation using the export's own self-check metrics.

The count reads the graph saved with ``ORT_ENABLE_EXTENDED``: the QDQ fusions into int8 kernels are
all done at that level, and ``ORT_ENABLE_ALL`` only adds layout changes (NCHWc, NHWC transposes)
that are specific to the machine and that onnxruntime warns about when saved (measured: the same
int8 node counts at both levels).
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from types import ModuleType
from typing import Any, Iterable, Sequence

import numpy as np

from qtrainer._checks import check_positive_int
from qtrainer._extras import require_extra
from qtrainer.quant.export.inference import as_inputs, run_batches
from qtrainer.quant.export.selfcheck import judge_runtime

__all__ = ["INT8_COMPUTE_NODES", "FLOAT_COMPUTE_NODES", "require_onnx", "require_onnxruntime", "load_onnxruntime",
           "run_onnxruntime", "onnxruntime_int8_nodes", "check_onnx"]

#: onnxruntime node types that compute a convolution / matrix product on int8 (what we count).
INT8_COMPUTE_NODES = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                      "QGemm", "DynamicQuantizeMatMul")
#: Other int8 kernels (glue between the int8 layers) reported besides.
INT8_OTHER_NODES = ("QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
                    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax")
#: Float compute nodes left in the optimized graph.
FLOAT_COMPUTE_NODES = ("Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")


def require_onnx() -> ModuleType:
    """The ``onnx`` module; ``ImportError`` naming the extra to install when it is missing."""
    return require_extra("onnx", "onnx", packages="onnx onnxruntime")


def require_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module; ``ImportError`` naming the extra to install when it is missing."""
    return require_extra("onnxruntime", "onnx")


def _session(path: str, num_threads: int, level: Any = None, optimized_path: str | None = None) -> Any:
    ort = require_onnxruntime()
    check_positive_int("num_threads", num_threads)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ONNX model at {path!r}; write it with convert_to_onnx(prefix, path)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no warnings about serializing hardware-specific graphs
    if level is not None:
        options.graph_optimization_level = level
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def load_onnxruntime(path: str, num_threads: int = 1) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path`` on the CPU provider (all optimizations)."""
    return _session(path, num_threads)


def run_onnxruntime(session: Any, batches: Iterable[Any]) -> list[np.ndarray]:
    """Run every batch; return each output concatenated over the batches (along axis 0).

    A batch is one array or one array per model input, as for ``inference.run_predictor``.
    """
    names = [i.name for i in session.get_inputs()]

    def run_one(batch: Any) -> list[np.ndarray]:
        arrays = as_inputs(batch)
        if len(arrays) != len(names):
            raise ValueError(f"the model takes {len(names)} input(s) ({', '.join(names)}), got {len(arrays)} array(s)")
        return session.run(None, dict(zip(names, arrays)))

    return run_batches(run_one, batches, caller="run_onnxruntime")


def onnxruntime_int8_nodes(path: str, num_threads: int = 1) -> dict[str, Any]:
    """What onnxruntime runs for ``path``: int8 and float compute nodes of its optimized graph.

    Returns ``{"int8_compute": n, "float_compute": n, "int8_nodes": {type: n}, "float_nodes":
    {type: n}, "other_int8": {type: n}, "nodes": {type: n}, "level": "extended"}``.
    """
    ort = require_onnxruntime()
    onnx = require_onnx()
    with tempfile.TemporaryDirectory(prefix="qtrainer-ort-") as directory:
        optimized = os.path.join(directory, "optimized.onnx")
        _session(path, num_threads, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized)
        graph = onnx.load(optimized, load_external_data=False).graph
        counts = Counter(node.op_type for node in graph.node)
    pick = lambda types: {t: counts[t] for t in types if counts[t]}  # noqa: E731
    int8, floats = pick(INT8_COMPUTE_NODES), pick(FLOAT_COMPUTE_NODES)
    return {"int8_compute": sum(int8.values()), "float_compute": sum(floats.values()), "int8_nodes": int8,
            "float_nodes": floats, "other_int8": pick(INT8_OTHER_NODES), "nodes": dict(counts), "level": "extended"}


def check_onnx(
    path: str,
    batches: Sequence[Any],
    reference: Sequence[np.ndarray],
    max_rel_l2: float,
    min_agreement: float,
    num_threads: int = 1,
    expected_int8_ops: int | None = None,
) -> dict[str, Any]:
    """The ONNX model at ``path`` on onnxruntime against ``reference`` (the dygraph simulation's outputs).

    The metrics and the verdict are the export self-check's (``selfcheck.compare_samples`` and
    ``judge``). Returns plain JSON data: the ``CheckResult`` fields (``passed``, ``rel_l2``,
    ``top1_agreement``, ``failures``, ...), ``runtime``/``onnxruntime`` (version) and ``graph`` (the
    ``onnxruntime_int8_nodes`` counts). With ``expected_int8_ops`` (the export's int8 layer calls),
    fewer int8 compute nodes is listed in ``notes`` and ``int8_ok`` is False.
    """
    ort = require_onnxruntime()
    deployed = run_onnxruntime(load_onnxruntime(path, num_threads), batches)
    graph = onnxruntime_int8_nodes(path, num_threads)
    result = judge_runtime("onnxruntime", deployed, reference, graph["int8_compute"], expected_int8_ops,
                           str(graph["float_nodes"] or ""), max_rel_l2, min_agreement)
    return {"runtime": "onnxruntime", "onnxruntime": ort.__version__, "model": path, "num_threads": num_threads,
            **result.to_dict(), "int8_ok": result.int8_ok, "graph": graph}
