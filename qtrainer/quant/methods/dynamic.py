"""Dynamic (weight-only, data-free) offline quantization of saved Paddle inference models.

``quant_post_dynamic`` reads a legacy inference model (``.pdmodel`` + ``.pdiparams``), stores the
weights of conv2d, depthwise_conv2d and matrix-multiply ops (``mul``, ``matmul`` and ``matmul_v2``,
which is what ``nn.Linear`` exports to) as int8 or int16 with one abs-max scale per output channel,
and makes the program dequantize them when it is loaded. Activations stay float32: the model is
smaller on disk and predicts like the float one, it is not faster.

How the weights are dequantized: each quantized weight ``W`` (int8/int16) feeds a ``cast`` to
float32 and an ``elementwise_mul`` by a persistable per-channel multiplier ``T / qmax`` (``T`` = the
channel's abs-max threshold, ``qmax = 2**(bits-1) - 1``), and the consumer op reads the product.
Both inputs are persistable, so Paddle Inference's constant folding can turn them back into a
float weight at load time. This format was chosen after measuring Paddle Inference 3.3.1 on CPU:
a ``dequantize_linear`` op on the weight loads for int8 on the legacy IR only (its kernel has no
int16 version, and the PIR ``delete_weight_dequant_linear_op_pass`` breaks the float model), while
``cast`` + ``elementwise_mul`` loads for int8 and int16, with and without oneDNN, on both IRs.

``quantize_dygraph_weights`` does the same for a dygraph ``nn.Layer``: it exports the layer as a
legacy inference model and quantizes that.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle

from qtrainer.quant.export.files import STATE_COMPLETE, make_staging_dir, publish

__all__ = ["quant_post_dynamic", "quantize_dygraph_weights", "SUPPORTED_OP_TYPES", "WEIGHT_QUANTIZE_TYPES"]

logger = logging.getLogger(__name__)

SUPPORTED_OP_TYPES = ("conv2d", "depthwise_conv2d", "mul", "matmul", "matmul_v2")
WEIGHT_QUANTIZE_TYPES = ("channel_wise_abs_max", "abs_max")
WEIGHT_BITS = (8, 16)
REPORT_SUFFIX = ".dynamic_quant.json"
_WEIGHT_SLOT = {"conv2d": "Filter", "depthwise_conv2d": "Filter", "mul": "Y", "matmul": "Y", "matmul_v2": "Y"}
_INT_DTYPES = {8: np.int8, 16: np.int16}
_CALLSTACK_ATTR = "op_callstack"
_PIR_HINT = (" {} looks like a PIR program, which this tool does not read: save a legacy model with "
             "`with paddle.pir_utils.DygraphOldIrGuard(): paddle.jit.save(layer, prefix, input_spec=...)`.")


# ---------------------------------------------------------------------------------------------
# Argument checks and file resolution (all before any work, so bad input changes nothing)
# ---------------------------------------------------------------------------------------------
def _check_options(weight_bits: Any, quantizable_op_type: Any, weight_quantize_type: Any) -> tuple[str, ...]:
    if isinstance(weight_bits, bool) or weight_bits not in WEIGHT_BITS:
        raise ValueError(f"quant_post_dynamic: weight_bits={weight_bits!r} is not supported; use 8 or 16")
    if weight_quantize_type not in WEIGHT_QUANTIZE_TYPES:
        raise ValueError(
            f"quant_post_dynamic: weight_quantize_type={weight_quantize_type!r} is unknown; "
            f"use one of {list(WEIGHT_QUANTIZE_TYPES)}"
        )
    if isinstance(quantizable_op_type, str) or not isinstance(quantizable_op_type, Sequence):
        raise TypeError(
            f"quant_post_dynamic: quantizable_op_type must be a list of op type names, "
            f"got {quantizable_op_type!r}; e.g. {list(SUPPORTED_OP_TYPES)}"
        )
    unknown = [t for t in quantizable_op_type if t not in SUPPORTED_OP_TYPES]
    if unknown or not quantizable_op_type:
        raise ValueError(
            f"quant_post_dynamic: quantizable_op_type={list(quantizable_op_type)!r} "
            + (f"has unsupported op types {unknown}" if unknown else "is empty")
            + f"; the supported op types are {list(SUPPORTED_OP_TYPES)}"
        )
    return tuple(dict.fromkeys(quantizable_op_type))


def _resolve_model_files(model_dir: str, model_filename: str | None, params_filename: str | None) -> tuple[str, str]:
    """``(model_path, params_path)`` from a directory (+ optional file names) or a path prefix."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        prefix = model_dir[: -len(".pdmodel")] if model_dir.endswith(".pdmodel") else model_dir
        if model_filename is None and os.path.isfile(prefix + ".pdmodel"):
            params = prefix + ".pdiparams"
            if params_filename:
                params = os.path.join(os.path.dirname(prefix), params_filename)
            if not os.path.isfile(params):
                raise FileNotFoundError(f"quant_post_dynamic: model {prefix}.pdmodel has no params file {params}")
            return prefix + ".pdmodel", params
        raise FileNotFoundError(
            f"quant_post_dynamic: no inference model at model_dir={model_dir!r}: it is not a directory "
            f"and {prefix + '.pdmodel'!r} does not exist."
            + (_PIR_HINT.format(os.path.basename(prefix) + ".json") if os.path.isfile(prefix + ".json") else "")
        )

    if model_filename is not None:
        candidates = [os.path.join(model_dir, model_filename), os.path.join(model_dir, model_filename + ".pdmodel")]
        model_path = next((c for c in candidates if os.path.isfile(c)), None)
        if model_path is None:
            raise FileNotFoundError(
                f"quant_post_dynamic: model_filename={model_filename!r} not found in {model_dir!r} "
                f"(looked for {candidates}); files there: {sorted(os.listdir(model_dir))}"
            )
    else:
        models = sorted(glob.glob(os.path.join(model_dir, "*.pdmodel")))
        if not models and os.path.isfile(os.path.join(model_dir, "__model__")):
            models = [os.path.join(model_dir, "__model__")]
        if len(models) > 1:
            raise ValueError(
                f"quant_post_dynamic: {model_dir!r} holds several models {[os.path.basename(m) for m in models]}; "
                "choose one with model_filename="
            )
        if not models:
            pir = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "*.json")))
            raise FileNotFoundError(
                f"quant_post_dynamic: no inference model in model_dir={model_dir!r}: looked for '*.pdmodel' "
                f"and '__model__'; files there: {sorted(os.listdir(model_dir))}."
                + (_PIR_HINT.format(", ".join(pir)) if pir else "")
            )
        model_path = models[0]

    if params_filename is not None:
        candidates = [os.path.join(model_dir, params_filename), os.path.join(model_dir, params_filename + ".pdiparams")]
    else:
        stem = os.path.basename(model_path)
        stem = stem[: -len(".pdmodel")] if stem.endswith(".pdmodel") else stem
        same_stem = os.path.join(model_dir, stem + ".pdiparams")
        others = sorted(glob.glob(os.path.join(model_dir, "*.pdiparams")))
        candidates = [same_stem] + (others if len(others) == 1 else []) + [os.path.join(model_dir, "__params__")]
    params_path = next((c for c in candidates if os.path.isfile(c)), None)
    if params_path is None:
        raise FileNotFoundError(
            f"quant_post_dynamic: no params file for {model_path!r} (looked for {candidates}); "
            f"files there: {sorted(os.listdir(model_dir))}. Pass params_filename= if it has another name."
        )
    return model_path, params_path


def _output_paths(
    model_path: str, params_path: str, save_model_dir: str, save_model_filename: str | None,
    save_params_filename: str | None,
) -> tuple[str, str]:
    model_name = save_model_filename or os.path.basename(model_path)
    if save_params_filename:
        params_name = save_params_filename
    elif model_name.endswith(".pdmodel"):
        params_name = model_name[: -len(".pdmodel")] + ".pdiparams"
    else:
        params_name = os.path.basename(params_path)
    out_model, out_params = os.path.join(save_model_dir, model_name), os.path.join(save_model_dir, params_name)
    sources = {os.path.realpath(model_path), os.path.realpath(params_path)}
    clash = [p for p in (out_model, out_params) if os.path.realpath(p) in sources]
    if clash:
        raise ValueError(
            f"quant_post_dynamic: the output {clash} would overwrite the input model; choose another "
            "save_model_dir or save_model_filename/save_params_filename"
        )
    if out_model == out_params:
        raise ValueError(f"quant_post_dynamic: model and params would both be written to {out_model!r}")
    return out_model, out_params


def _check_save_dir(save_model_dir: str) -> None:
    """Fail early when ``save_model_dir`` is a file or cannot be written; leaves nothing behind."""
    if os.path.exists(save_model_dir) and not os.path.isdir(save_model_dir):
        raise ValueError(f"quant_post_dynamic: save_model_dir={save_model_dir!r} is an existing file, not a directory")
    created = []
    path = os.path.abspath(save_model_dir)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        for directory in reversed(created):
            os.mkdir(directory)
        with tempfile.TemporaryFile(dir=save_model_dir):
            pass
    except OSError as error:
        raise ValueError(f"quant_post_dynamic: save_model_dir={save_model_dir!r} is not writable ({error})") from error
    finally:
        for directory in created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)


# ---------------------------------------------------------------------------------------------
# Planning: which weights to quantize, along which axis
# ---------------------------------------------------------------------------------------------
@dataclass
class _Weight:
    name: str
    shape: list[int]
    consumers: list[tuple[int, Any]] = field(default_factory=list)  # (block index, op)

    @property
    def op_types(self) -> list[str]:
        return sorted({op.type for _, op in self.consumers})


def _channel_axis(op, weight_ndim: int, per_channel: bool) -> int | None:
    """Output-channel axis of an op's weight, or ``None`` for one per-tensor scale."""
    if not per_channel or weight_ndim < 2:
        return None
    if op.type in ("conv2d", "depthwise_conv2d"):
        return 0  # [out, in / groups, kh, kw]
    if op.type == "mul":
        return 1 if weight_ndim == 2 and op.attr("y_num_col_dims") == 1 else None
    transposed = op.attr("trans_y") if op.type == "matmul_v2" else op.attr("transpose_Y")
    return weight_ndim - 2 if transposed else weight_ndim - 1  # Y is [..., in, out] or [..., out, in]


def _plan(program, op_types: tuple[str, ...], per_channel: bool) -> tuple[list[tuple[_Weight, int | None]], list[dict]]:
    """Split the model's float weights into (weight, axis) to quantize and skipped ones with a reason."""
    global_block = program.global_block()
    weights: dict[str, _Weight] = {}
    for block_index in range(program.num_blocks):
        for op in program.block(block_index).ops:
            for name in op.input_arg_names:
                var = global_block._find_var_recursive(name)
                if var is None or not var.persistable or var.type != paddle.framework.core.VarDesc.VarType.DENSE_TENSOR:
                    continue
                weight = weights.setdefault(name, _Weight(name, list(var.shape)))
                weight.consumers.append((block_index, op))

    selected, skipped = [], []
    for weight in weights.values():
        var = global_block._find_var_recursive(weight.name)
        candidate = any(op.type in _WEIGHT_SLOT for _, op in weight.consumers)
        if len(weight.shape) < 2 and not candidate:
            continue  # biases, BN statistics, shapes: never weights of a quantizable op
        reason = _skip_reason(weight, var, op_types)
        if reason is None:
            axes = {_channel_axis(op, len(weight.shape), per_channel) for _, op in weight.consumers}
            if len(axes) > 1:
                reason = f"its consumers need different channel axes {sorted(axes, key=str)}"
            else:
                selected.append((weight, axes.pop()))
                continue
        skipped.append({"name": weight.name, "op_types": weight.op_types, "shape": weight.shape, "reason": reason})
    return selected, skipped


def _skip_reason(weight: _Weight, var, op_types: tuple[str, ...]) -> str | None:
    for block_index, op in weight.consumers:
        if op.type not in _WEIGHT_SLOT:
            return f"also read by a '{op.type}' op, which is not a quantizable op"
        if op.type not in op_types:
            return f"op type '{op.type}' is not in quantizable_op_type {list(op_types)}"
        if weight.name not in op.input(_WEIGHT_SLOT[op.type]):
            return f"it is not the '{op.type}' op's weight input {_WEIGHT_SLOT[op.type]}"
        if block_index != 0:
            return "it is read inside a control-flow sub-block"
    if var.dtype != paddle.framework.core.VarDesc.VarType.FP32:
        return f"dtype {var.dtype} is not float32"
    return None


# ---------------------------------------------------------------------------------------------
# Quantization proper
# ---------------------------------------------------------------------------------------------
def _quantize_array(weight: np.ndarray, axis: int | None, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(integer codes, per-channel threshold T)``: ``weight ≈ codes * T / qmax`` (abs-max, symmetric)."""
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        threshold = np.abs(weight).max(keepdims=True).reshape([1] * weight.ndim)
    else:
        reduce_axes = tuple(a for a in range(weight.ndim) if a != axis)
        threshold = np.abs(weight).max(axis=reduce_axes, keepdims=True)
    safe = np.where(threshold > 0, threshold, 1.0).astype(np.float64)
    codes = np.clip(np.rint(weight.astype(np.float64) / safe * qmax), -qmax, qmax).astype(_INT_DTYPES[bits])
    return codes, threshold.astype(np.float32)


def _unique_var_name(block, base: str) -> str:
    name, index = base, 0
    while block.has_var(name):
        index += 1
        name = f"{base}_{index}"
    return name


def _insert_dequantize(block, scope, place, weight: _Weight, multiplier: np.ndarray, bits: int) -> None:
    """Make ``weight`` an integer tensor and put ``cast`` + ``elementwise_mul`` before its first reader."""
    var_type = paddle.framework.core.VarDesc.VarType
    int_type = var_type.INT8 if bits == 8 else var_type.INT16
    block.var(weight.name).desc.set_dtype(int_type)
    scale = block.create_var(name=_unique_var_name(block, weight.name + ".dequant_scale"), shape=list(multiplier.shape),
                             dtype="float32", persistable=True)
    scope.var(scale.name).get_tensor().set(multiplier, place)
    as_float = block.create_var(name=_unique_var_name(block, weight.name + ".as_float"), shape=weight.shape,
                                dtype="float32", persistable=False)
    dequantized = block.create_var(name=_unique_var_name(block, weight.name + ".dequantized"), shape=weight.shape,
                                   dtype="float32", persistable=False)
    first = min(block.ops.index(op) for _, op in weight.consumers)
    block._insert_op(first, type="cast", inputs={"X": [weight.name]}, outputs={"Out": [as_float]},
                     attrs={"in_dtype": int_type, "out_dtype": var_type.FP32})
    block._insert_op(first + 1, type="elementwise_mul", inputs={"X": [as_float], "Y": [scale]},
                     outputs={"Out": [dequantized]}, attrs={"axis": -1})
    for new_op in block.ops[first:first + 2]:
        new_op._set_attr(_CALLSTACK_ATTR, [])  # else the Python stack of this call is saved in the model
    for _, op in weight.consumers:
        op._rename_input(weight.name, dequantized.name)


@contextlib.contextmanager
def _legacy_static_graph() -> Iterator[None]:
    """Legacy (non-PIR) static mode with a private scope and name generator; the caller's mode is restored.

    ``OldIrGuard`` enables static mode (when called from dygraph) and turns the PIR API off; its exit
    undoes both, also when the body raises.
    """
    was_dynamic = paddle.in_dynamic_mode()
    try:
        with paddle.pir_utils.OldIrGuard():
            with paddle.static.scope_guard(paddle.static.Scope()), paddle.utils.unique_name.guard():
                yield
    finally:
        if was_dynamic and not paddle.in_dynamic_mode():  # never leave the caller in static mode
            paddle.disable_static()


def _write_files(contents: dict[str, bytes], report_path: str, report: dict[str, Any]) -> None:
    """Stage every file next to the target, then publish them with the report last, carrying their
    SHA-256 (``qtrainer.quant.export.files``: a kill in between leaves files our loaders refuse)."""
    parent = os.path.dirname(report_path) or "."
    stem = os.path.basename(report_path)[: -len(REPORT_SUFFIX)]
    os.makedirs(parent, exist_ok=True)
    staging = make_staging_dir(parent, stem)
    try:
        moves = {}
        for index, (path, data) in enumerate(contents.items()):
            staged = os.path.join(staging, f"{index}-{os.path.basename(path)}")
            with open(staged, "wb") as stream:
                stream.write(data)
            moves[staged] = path
        report["sha256"] = publish(moves, report_path, report)
        report["state"] = STATE_COMPLETE
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _serialize(program, executor) -> tuple[bytes, bytes]:
    block = program.global_block()
    feeds = [block.var(n) for n in program.desc.get_feed_target_names()]
    fetches = [block.var(n) for n in program.desc.get_fetch_target_names()]
    return (paddle.static.serialize_program(feeds, fetches, program=program),
            paddle.static.serialize_persistables(feeds, fetches, executor, program=program))


def quant_post_dynamic(
    model_dir: str,
    save_model_dir: str,
    model_filename: str | None = None,
    params_filename: str | None = None,
    save_model_filename: str | None = None,
    save_params_filename: str | None = None,
    quantizable_op_type: Sequence[str] = SUPPORTED_OP_TYPES,
    weight_bits: int = 8,
    generate_test_model: bool = False,
    weight_quantize_type: str = "channel_wise_abs_max",
) -> dict[str, Any]:
    """Quantize the weights of a saved inference model to int8/int16, no data needed.

    Args:
        model_dir: directory holding the float model, or its path prefix (``dir/model`` for
            ``dir/model.pdmodel`` + ``dir/model.pdiparams``). Must be a legacy program, as written by
            ``paddle.jit.save`` inside ``paddle.pir_utils.DygraphOldIrGuard()``.
        save_model_dir: directory for the quantized model (created if needed).
        model_filename, params_filename: file names inside ``model_dir``; by default the single
            ``*.pdmodel`` there and the ``*.pdiparams`` with the same stem.
        save_model_filename, save_params_filename: output file names; by default the input model's
            name and the matching ``.pdiparams``.
        quantizable_op_type: op types whose weights are quantized, from ``SUPPORTED_OP_TYPES``.
            ``nn.Linear`` exports as ``matmul_v2``; ``conv2d_transpose`` and embeddings are not supported.
        weight_bits: 8 or 16.
        generate_test_model: also write ``save_model_dir/test_model/`` with the same program and
            float weights holding the quantize-dequantized values (to check accuracy anywhere).
        weight_quantize_type: ``'channel_wise_abs_max'`` (one scale per output channel: conv axis 0,
            matmul ``Y`` its last axis, the one before it when ``trans_y``) or ``'abs_max'`` (one scale).

    Returns:
        The report also written to ``<save_model_dir>/<model stem>.dynamic_quant.json``: output files
        and sizes, and for every weight either how it was quantized or why it was skipped.
    """
    op_types = _check_options(weight_bits, quantizable_op_type, weight_quantize_type)
    model_path, params_path = _resolve_model_files(model_dir, model_filename, params_filename)
    return _quantize_files(model_path, params_path, os.fspath(save_model_dir), save_model_filename,
                           save_params_filename, op_types, weight_bits, weight_quantize_type, generate_test_model,
                           source={"model": model_path, "params": params_path})


def _quantize_files(
    model_path: str, params_path: str, save_model_dir: str, save_model_filename: str | None,
    save_params_filename: str | None, op_types: tuple[str, ...], weight_bits: int, weight_quantize_type: str,
    generate_test_model: bool, source: dict[str, Any],
) -> dict[str, Any]:
    out_model, out_params = _output_paths(model_path, params_path, save_model_dir, save_model_filename,
                                          save_params_filename)
    _check_save_dir(save_model_dir)
    with open(model_path, "rb") as stream:
        program_bytes = stream.read()
    with open(params_path, "rb") as stream:
        params_bytes = stream.read()

    qmax = 2 ** (weight_bits - 1) - 1
    files: dict[str, bytes | str] = {}
    quantized: list[dict[str, Any]] = []
    with _legacy_static_graph():
        place = paddle.CPUPlace()
        executor = paddle.static.Executor(place)
        scope = paddle.static.global_scope()
        try:
            program = paddle.static.deserialize_program(program_bytes)
            paddle.static.deserialize_persistables(program, params_bytes, executor)
        except Exception as error:
            raise ValueError(
                f"quant_post_dynamic: cannot read {model_path!r} + {params_path!r} as a legacy Paddle inference "
                f"model ({type(error).__name__}: {error})"
            ) from error
        selected, skipped = _plan(program, op_types, weight_quantize_type == "channel_wise_abs_max")
        if not selected:
            found = sorted({op.type for b in range(program.num_blocks) for op in program.block(b).ops})
            raise ValueError(
                f"quant_post_dynamic: nothing to quantize in {model_path!r} with quantizable_op_type={list(op_types)}; "
                f"its op types are {found}; skipped weights: "
                + (", ".join(f"{s['name']} ({s['reason']})" for s in skipped) or "none")
            )

        results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for weight, axis in selected:
            tensor = scope.find_var(weight.name).get_tensor()
            values = np.array(tensor)
            codes, threshold = _quantize_array(values, axis, weight_bits)
            multiplier = (threshold / np.float32(qmax)).astype(np.float32)
            dequantized = codes.astype(np.float32) * multiplier
            norm = float(np.linalg.norm(values))
            quantized.append({
                "name": weight.name, "op_types": weight.op_types, "shape": weight.shape, "axis": axis,
                "bits": weight_bits, "channels": int(threshold.size),
                "threshold": {"min": float(threshold.min()), "max": float(threshold.max()),
                              "mean": float(threshold.mean())},
                "relative_error": float(np.linalg.norm(values - dequantized)) / norm if norm > 0 else 0.0,
            })
            results[weight.name] = (codes, multiplier, dequantized)

        if generate_test_model:
            for weight, _ in selected:
                scope.find_var(weight.name).get_tensor().set(results[weight.name][2], place)
            test_dir = os.path.join(save_model_dir, "test_model")
            test_model, test_params = _serialize(program, executor)
            files[os.path.join(test_dir, os.path.basename(out_model))] = test_model
            files[os.path.join(test_dir, os.path.basename(out_params))] = test_params

        block = program.global_block()
        for weight, _ in selected:
            codes, multiplier, _ = results[weight.name]
            scope.find_var(weight.name).get_tensor().set(codes, place)
            _insert_dequantize(block, scope, place, weight, multiplier, weight_bits)
        files[out_model], files[out_params] = _serialize(program, executor)

    report = {
        "source": {**source, "params_bytes": len(params_bytes)},
        "output": {"model": out_model, "params": out_params, "params_bytes": len(files[out_params]),
                   "params_ratio": len(files[out_params]) / max(len(params_bytes), 1)},
        "weight_bits": weight_bits, "weight_quantize_type": weight_quantize_type,
        "quantizable_op_type": list(op_types), "dequantize": "cast + elementwise_mul by threshold / qmax",
        "quantized": quantized, "skipped": skipped,
    }
    stem = os.path.basename(out_model)
    stem = stem[: -len(".pdmodel")] if stem.endswith(".pdmodel") else stem
    report_path = os.path.join(save_model_dir, stem + REPORT_SUFFIX)
    report["report"] = report_path
    _write_files(files, report_path, report)
    logger.info("quantized %d weights to int%d (params %d -> %d bytes, %.3fx); skipped %d: %s",
                len(quantized), weight_bits, len(params_bytes), report["output"]["params_bytes"],
                report["output"]["params_ratio"], len(skipped), [(s["name"], s["reason"]) for s in skipped])
    return report


def quantize_dygraph_weights(
    model: paddle.nn.Layer,
    save_path: str,
    input_spec: Sequence[Any],
    weight_bits: int = 8,
    **kwargs: Any,
) -> dict[str, Any]:
    """Export a dygraph ``model`` (in eval mode) and quantize its weights like ``quant_post_dynamic``.

    ``save_path`` is a path prefix, as for ``paddle.jit.save``: the result is ``save_path.pdmodel`` +
    ``save_path.pdiparams`` (+ ``save_path.dynamic_quant.json``). ``input_spec`` is the list of
    ``paddle.static.InputSpec`` (or example tensors) of ``forward``. ``kwargs`` go to
    ``quant_post_dynamic`` (``quantizable_op_type``, ``weight_quantize_type``, ``generate_test_model``).
    The model's training mode is restored afterwards.
    """
    if not isinstance(model, paddle.nn.Layer):
        raise TypeError(f"quantize_dygraph_weights: model must be a paddle.nn.Layer, got {type(model).__name__}")
    if not paddle.in_dynamic_mode():
        raise ValueError("quantize_dygraph_weights needs dynamic-graph mode; call paddle.disable_static() first")
    unknown = sorted(set(kwargs) - {"quantizable_op_type", "weight_quantize_type", "generate_test_model"})
    if unknown:
        raise TypeError(
            f"quantize_dygraph_weights: unexpected arguments {unknown}; it takes quantizable_op_type, "
            "weight_quantize_type and generate_test_model"
        )
    weight_quantize_type = kwargs.get("weight_quantize_type", "channel_wise_abs_max")
    op_types = _check_options(weight_bits, kwargs.get("quantizable_op_type", SUPPORTED_OP_TYPES), weight_quantize_type)
    save_path = os.fspath(save_path)
    save_dir, stem = os.path.split(save_path)
    if not stem:
        raise ValueError(f"quantize_dygraph_weights: save_path={save_path!r} must be a path prefix such as 'out/model'")
    _check_save_dir(save_dir or ".")
    was_training = model.training
    with tempfile.TemporaryDirectory(prefix="qtrainer-fp32-") as export_dir:
        model.eval()
        try:
            with paddle.pir_utils.DygraphOldIrGuard():
                paddle.jit.save(model, os.path.join(export_dir, "model"), input_spec=list(input_spec))
        finally:
            if was_training:
                model.train()
        return _quantize_files(
            os.path.join(export_dir, "model.pdmodel"), os.path.join(export_dir, "model.pdiparams"), save_dir or ".",
            stem + ".pdmodel", stem + ".pdiparams", op_types, weight_bits, weight_quantize_type,
            bool(kwargs.get("generate_test_model", False)), source={"model": f"dygraph {type(model).__name__}"})
