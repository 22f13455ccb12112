"""The ONNX int8 export on onnxruntime (and OpenVINO) vs onnxruntime's and NNCF's own PTQ of the FP32 model.

    python benchmarks/onnx_export.py                    # MobileNetV1/V2, ResNet18/50; batch 1, 8; threads 1, 2
    python benchmarks/onnx_export.py --quick            # smoke run: MobileNetV1, batch 1, 1 thread, 2 rounds of 3
    python benchmarks/onnx_export.py --models ResNet18 --batches 8 --threads 2 --rounds 9

The models are those of ``benchmarks/qat_export.py`` (``build_speed_models``: ``paddle.vision``
models with random weights at 224 px, batch-norm statistics from one random batch, ``QAT`` scales
observed on three random batches of 8, exported int8 for Paddle with ``export_quantized_model`` on
the last two as sample inputs; the FP32 model saved with ``paddle.jit.save``). Each one is run as:

* ``ort fp32``: the FP32 ``.pdmodel`` converted by ``paddle2onnx`` 2.1 (opset 13, in a subprocess:
  paddle2onnx can abort the process), on onnxruntime -- the baseline of every ratio;
* ``ours``: our int8 export converted with ``convert_to_onnx(int8_prefix, ..., calibration=sample
  inputs)`` (``qtrainer.quant.export.onnx``: QDQ, int8 weights), on onnxruntime;
* the peer, ``onnxruntime.quantization.quantize_static`` of the FP32 ONNX (QDQ, ``per_channel=True``,
  MinMax calibration through a ``CalibrationDataReader`` over the same three batches our QAT scales
  were observed on), as ``peer u8s8`` (activations u8, weights s8) and ``peer s8s8``; by default
  ``quant_pre_process`` (symbolic shape inference, onnxruntime's graph optimizations: the batch
  norms folded into the convolutions) runs first, as onnxruntime's documentation advises
  (``--no-preprocess`` skips it; the JSON records which was done and whether it failed);
* with OpenVINO installed (``--no-openvino`` skips it): the FP32 ONNX (``ov fp32``) and our
  ``model.onnx`` (``ov ours``) converted as ``formats=("paddle", "openvino")`` writes it
  (``convert_openvino``: code clamps moved before their quantize), and OpenVINO + NNCF PTQ
  (``nncf.quantize`` of the FP32 ONNX's OpenVINO model, ``target_device=CPU``, the same three
  batches: ``deploy_speed.nncf_model``), compiled as ``load_openvino`` does (latency hint, one stream,
  fp32 inference precision) for the static batch size timed.

Latency: for each batch size and thread count every runtime is timed in alternation (``--rounds``
rounds of ``--iters`` runs each, after two warm-up runs; ``deploy_speed.time_interleaved``); a
latency is the median over the rounds and a ratio the median of the per-round ratios (other
processes share the CPU, so only interleaved ratios are meaningful): speed-up over ``ort fp32``
(and, for OpenVINO, over ``ov fp32``), ``ours vs peer`` = the faster peer variant's latency over
ours and ``ours vs nncf`` = NNCF's over ours in OpenVINO (> 1: ours is faster).

Int8 kernels: ``onnxruntime_int8_nodes`` counts the int8 compute nodes (``QLinearConv``, ``QGemm``,
...) and the float ones left in onnxruntime's optimized graph of each model; for OpenVINO,
``runtime_precisions`` (compute nodes running u8/i8).

Agreement: each int8 model's outputs on the export's sample inputs (16 images) against the dygraph
simulation (the QAT model after ``working_copy``, as the export self-check computes its reference),
with the self-check's metrics (``selfcheck.compare_samples``: relative L2 error, top-1 agreement
over all samples), and also against ``ort fp32``. With random weights this says little: the
fake-quant simulation of such a network is chaotic (see ``build_speed_models``), near-tied top-1
scores are the rule, and the peers never saw the simulation (they quantize the FP32 model); the
numbers are printed as a sanity check of the conversions, not as accuracy. Accuracy on trained
models comes from the recipes (``python -m recipes.run ARCH qat --export onnx``: ``results.json``
has the full validation set on onnxruntime beside Paddle Inference).

Results: ``benchmarks/results/onnx_export[_quick][_4archs]_<int8 ISA>.json`` (``--results-dir`` to
write elsewhere, e.g. for a smoke run).
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import qat_export  # noqa: E402
from _common import (  # noqa: E402
    SPEED_MODELS, add_speed_arguments, machine, median, print_table, resolve_speed_arguments, write_json,
)
from deploy_speed import _nncf, _ratio, calibration_batches, nncf_model, time_interleaved  # noqa: E402
from qat_export import build_speed_models  # noqa: E402
from qtrainer.quant.export.onnx import (  # noqa: E402
    convert_to_onnx,
    load_onnxruntime,
    onnxruntime_int8_nodes,
    require_onnx,
    require_onnxruntime,
    run_onnxruntime,
)
from qtrainer.quant.export.openvino import (  # noqa: E402
    convert_openvino,
    load_openvino,
    require_openvino,
    run_openvino,
    runtime_precisions,
)
from qtrainer.quant.export.plan import working_copy  # noqa: E402
from qtrainer.quant.export.selfcheck import compare_samples, dygraph_outputs  # noqa: E402

MODELS = SPEED_MODELS
ORT_RUNTIMES = ["ort_fp32", "ours", "peer_u8s8", "peer_s8s8"]
OV_RUNTIMES = ["ov_fp32", "ov_ours", "ov_nncf"]
INT8_RUNTIMES = ["ours", "peer_u8s8", "peer_s8s8", "ov_ours", "ov_nncf"]
#: the peer's variants: (activation type, weight type) of ``quantize_static``
PEERS = {"peer_u8s8": ("QUInt8", "QInt8"), "peer_s8s8": ("QInt8", "QInt8")}
OPSET = 13
#: the export self-check's default ``max_rel_l2``, as the top-1 margin of ``compare_samples``
MAX_REL_L2 = 0.05


# ====================================================================== the models
def build_with_reference(name: str, workdir: str, clip, target: str = "portable") -> tuple[str, str, dict, list[np.ndarray], list[np.ndarray]]:
    """``build_speed_models(name, ...)``, keeping its sample inputs and the simulation's outputs on them.

    ``build_speed_models`` returns neither the QAT model nor its samples, so both are taken where it
    hands them to ``export_quantized_model`` (a wrapper in ``qat_export``'s namespace for the
    duration of the call; the export's arguments are passed on unchanged). The reference is what the
    self-check compares with: the model's ``working_copy`` (eval mode, frozen thresholds) run in
    dygraph. Returns ``(fp32_prefix, int8_prefix, info, samples, reference)``.
    """
    captured: dict[str, Any] = {}
    export = qat_export.export_quantized_model

    def capturing_export(model, path, **kwargs):
        captured["samples"] = [np.asarray(s) for s in kwargs["sample_inputs"]]
        captured["reference"] = dygraph_outputs(working_copy(model), [[s] for s in captured["samples"]])
        return export(model, path, **kwargs)

    qat_export.export_quantized_model = capturing_export
    try:
        fp32_prefix, int8_prefix, info = build_speed_models(name, workdir, clip, target)
    finally:
        qat_export.export_quantized_model = export
    return fp32_prefix, int8_prefix, info, captured["samples"], captured["reference"]


def paddle2onnx_fp32(fp32_prefix: str, onnx_path: str) -> float:
    """The FP32 Paddle model converted by the ``paddle2onnx`` CLI in a subprocess; returns its seconds."""
    directory, stem = os.path.split(fp32_prefix)
    command = [sys.executable, "-m", "paddle2onnx.command", "--model_dir", directory,
               "--model_filename", stem + ".pdmodel", "--params_filename", stem + ".pdiparams",
               "--save_file", onnx_path, "--opset_version", str(OPSET)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 or not os.path.isfile(onnx_path):
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"paddle2onnx failed on {fp32_prefix}.pdmodel (exit code {done.returncode}):\n{tail}")
    return time.perf_counter() - start


class _Batches:
    """A ``CalibrationDataReader`` (it only needs ``get_next``) over numpy batches of one input."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self._items = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def peer_models(fp32_onnx: str, directory: str, preprocess: bool,
                batches: list[np.ndarray] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """onnxruntime's ``quantize_static`` of ``fp32_onnx``, U8S8 and S8S8, on ``batches`` (default:
    the calibration batches)."""
    batches = calibration_batches() if batches is None else batches
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    info: dict[str, Any] = {"preprocess": "none"}
    source = fp32_onnx
    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = os.path.join(directory, "fp32_pre.onnx")
        try:
            quant_pre_process(fp32_onnx, pre)
            source, info["preprocess"] = pre, "quant_pre_process"
        except Exception as err:  # the peer is then quantized from the model as paddle2onnx wrote it
            info["preprocess"] = f"quant_pre_process failed ({type(err).__name__}: {err}); not preprocessed"
            logging.getLogger(__name__).warning("%s", info["preprocess"])
    input_name = load_onnxruntime(source).get_inputs()[0].name
    paths = {}
    for runtime, (activations, weights) in PEERS.items():
        path = os.path.join(directory, f"{runtime}.onnx")
        start = time.perf_counter()
        quantize_static(source, path, _Batches(input_name, batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=getattr(QuantType, activations),
                        weight_type=getattr(QuantType, weights), calibrate_method=CalibrationMethod.MinMax)
        info[f"{runtime}_seconds"] = round(time.perf_counter() - start, 1)
        paths[runtime] = path
    return paths, info


def openvino_models(fp32_onnx: str, int8_prefix: str, ours_onnx: str, directory: str,
                    use_nncf: bool) -> tuple[dict[str, str], dict]:
    """OpenVINO IR of the FP32 ONNX (``convert_model``), of ours as the export writes it
    (``convert_openvino`` from our ONNX), and NNCF's PTQ of the FP32 one."""
    ov = require_openvino()
    paths = {"ov_fp32": os.path.join(directory, "ov_fp32.xml"), "ov_ours": os.path.join(directory, "ov_ours.xml")}
    info: dict = {}
    ov.save_model(ov.convert_model(fp32_onnx), paths["ov_fp32"], compress_to_fp16=False)
    convert_openvino(int8_prefix, paths["ov_ours"], onnx_model=ours_onnx)
    if use_nncf:
        start = time.perf_counter()
        paths["ov_nncf"] = nncf_model(paths["ov_fp32"], os.path.join(directory, "ov_nncf.xml"))
        info["nncf_seconds"] = round(time.perf_counter() - start, 1)
    return paths, info


def prepare_model(name: str, workdir: str, args) -> tuple[dict[str, str], dict, list[np.ndarray], list[np.ndarray]]:
    """Every model of ``name``: ``({runtime: path}, info, samples, reference)``."""
    fp32_prefix, int8_prefix, info, samples, reference = build_with_reference(name, workdir, args.clip, args.target)
    directory = os.path.dirname(fp32_prefix)
    paths = {"ort_fp32": os.path.join(directory, "fp32.onnx"), "ours": os.path.join(directory, "ours_int8.onnx")}
    info["paddle2onnx_seconds"] = round(paddle2onnx_fp32(fp32_prefix, paths["ort_fp32"]), 1)
    conversion = convert_to_onnx(int8_prefix, paths["ours"], opset=OPSET, calibration=samples)
    info["ours_conversion"] = {k: v for k, v in conversion.items() if k not in ("path", "quantized_outputs")}
    peers, info["peer"] = peer_models(paths["ort_fp32"], directory, not args.no_preprocess)
    paths.update(peers)
    if args.openvino:
        ov_paths, info["openvino"] = openvino_models(paths["ort_fp32"], int8_prefix, paths["ours"], directory, args.nncf)
        paths.update(ov_paths)
    return paths, info, samples, reference


# ====================================================================== what runs int8, and agreement
def int8_kernels(paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per runtime: int8 / float compute nodes (onnxruntime's optimized graph, OpenVINO's runtime model)."""
    kernels = {}
    for runtime, path in paths.items():
        if runtime.startswith("ov_"):
            summary = runtime_precisions(load_openvino(path))["summary"]
            kernels[runtime] = {"int8_compute": summary["int8_compute"], "float_compute": summary["float_compute"],
                                "float_nodes": summary["float_nodes"]}
        else:
            graph = onnxruntime_int8_nodes(path)
            kernels[runtime] = {k: graph[k] for k in ("int8_compute", "float_compute", "int8_nodes",
                                                      "float_nodes", "other_int8")}
    return kernels


def _outputs(runtime: str, path: str, samples: list[np.ndarray], threads: int) -> list[np.ndarray]:
    if runtime.startswith("ov_"):
        return run_openvino(load_openvino(path, num_threads=threads), samples)
    return run_onnxruntime(load_onnxruntime(path, num_threads=threads), samples)


def agreement(paths: dict[str, str], samples: list[np.ndarray], reference: list[np.ndarray],
              threads: int) -> dict[str, dict[str, Any]]:
    """Per runtime: rel. L2 and top-1 agreement vs the simulation and vs ``ort fp32`` (sample inputs)."""
    outputs = {runtime: _outputs(runtime, path, samples, threads) for runtime, path in paths.items()}
    result = {}
    for runtime, got in outputs.items():
        entry = {}
        for against, expected in (("sim", reference), ("fp32", outputs["ort_fp32"])):
            if against == "fp32" and runtime == "ort_fp32":
                continue
            comparison = compare_samples(got, expected, margin_rel_l2=MAX_REL_L2)
            entry.update({f"rel_l2_vs_{against}": comparison.rel_l2,
                          f"top1_vs_{against}": comparison.top1_agreement_all,
                          f"top1_judged_vs_{against}": comparison.top1_agreement,
                          f"judged_samples_vs_{against}": comparison.judged_samples})
        entry["samples"] = int(reference[0].shape[0])
        result[runtime] = entry
    return result


# ====================================================================== latency
def _onnxruntime_runner(session) -> Callable[[np.ndarray], Any]:
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})


def _openvino_runner(compiled) -> Callable[[np.ndarray], Any]:
    request = compiled.create_infer_request()
    return lambda batch: request.infer([batch])


def load_runners(paths: dict[str, str], threads: int, batch_size: int) -> dict[str, Callable[[np.ndarray], Any]]:
    """A run function per runtime; the OpenVINO models compiled for a static ``batch_size``."""
    runners = {}
    for runtime, path in paths.items():
        if runtime.startswith("ov_"):
            runners[runtime] = _openvino_runner(load_openvino(path, num_threads=threads, batch_size=batch_size))
        else:
            runners[runtime] = _onnxruntime_runner(load_onnxruntime(path, num_threads=threads))
    return runners


def speed_row(name: str, paths: dict[str, str], threads: int, batch_size: int, args, rng) -> dict[str, Any]:
    runners = load_runners(paths, threads, batch_size)
    batch = rng.standard_normal([batch_size, 3, 224, 224]).astype("float32")
    times = time_interleaved(runners, batch, args.rounds, args.iters)
    del runners
    row: dict[str, Any] = {"model": name, "batch": batch_size, "threads": threads}
    row.update({f"{r}_ms": round(median(times[r]), 2) for r in ORT_RUNTIMES + OV_RUNTIMES if r in times})
    for runtime in ("ours", "peer_u8s8", "peer_s8s8"):
        row[f"{runtime}_speedup"] = _ratio(times, "ort_fp32", runtime)
    best = min(PEERS, key=lambda r: median(times[r]))
    row.update(peer_best=best, ours_vs_peer=_ratio(times, best, "ours"))
    if "ov_fp32" in times:
        row.update(ov_ours_speedup=_ratio(times, "ov_fp32", "ov_ours"),
                   ov_nncf_speedup=_ratio(times, "ov_fp32", "ov_nncf"),
                   ours_vs_nncf=_ratio(times, "ov_nncf", "ov_ours"),
                   ov_ours_vs_ort_ours=_ratio(times, "ours", "ov_ours"))
    return row


# ====================================================================== tables
def _cell(value: Any) -> Any:
    return "" if value is None else value


def print_tables(args, rows: list[dict], infos: dict[str, dict]) -> None:
    print(f"\nonnxruntime latency in ms (224 px, median of {args.rounds} interleaved rounds of {args.iters} runs); "
          "x = speed-up over ort fp32; ours vs peer > 1: ours is faster than the faster peer variant")
    keys = ["ort_fp32_ms", "ours_ms", "ours_speedup", "peer_u8s8_ms", "peer_u8s8_speedup", "peer_s8s8_ms",
            "peer_s8s8_speedup", "ours_vs_peer"]
    print_table(["model", "batch", "threads", "ort fp32", "ours", "x", "peer u8s8", "x", "peer s8s8", "x",
                 "ours vs peer"],
                [[r["model"], r["batch"], r["threads"]] + [_cell(r.get(k)) for k in keys] for r in rows])
    if args.openvino:
        print("\nOpenVINO latency in ms (same rounds); x = speed-up over ov fp32; ours vs nncf > 1: ours is faster")
        keys = ["ov_fp32_ms", "ov_ours_ms", "ov_ours_speedup", "ov_nncf_ms", "ov_nncf_speedup", "ours_vs_nncf"]
        print_table(["model", "batch", "threads", "ov fp32", "ov ours", "x", "ov nncf", "x", "ours vs nncf"],
                    [[r["model"], r["batch"], r["threads"]] + [_cell(r.get(k)) for k in keys] for r in rows])
    print("\nInt8 compute nodes (int8 / float) of what the runtime runs, and agreement on the sample inputs "
          "vs the dygraph simulation and vs ort fp32 (random weights: a sanity check, not accuracy)")
    table = []
    for name, info in infos.items():
        for runtime in ["ort_fp32"] + INT8_RUNTIMES:
            kernels, agree = info["kernels"].get(runtime), info["agreement"].get(runtime)
            if kernels is None:
                continue
            table.append([name, runtime, f"{kernels['int8_compute']} / {kernels['float_compute']}",
                          agree["rel_l2_vs_sim"], _cell(agree["top1_vs_sim"]), _cell(agree.get("rel_l2_vs_fp32")),
                          _cell(agree.get("top1_vs_fp32"))])
    print_table(["model", "runtime", "int8 / float nodes", "rel L2 vs sim", "top-1 vs sim", "rel L2 vs fp32",
                 "top-1 vs fp32"], table)


# ====================================================================== main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_speed_arguments(parser)
    parser.add_argument("--no-preprocess", action="store_true",
                        help="quantize the peer without onnxruntime's quant_pre_process")
    parser.add_argument("--no-openvino", action="store_true", help="skip OpenVINO even when it is installed")
    parser.add_argument("--no-nncf", action="store_true", help="skip OpenVINO + NNCF even when nncf is installed")
    parser.add_argument("--workdir", default=None, help="keep the exported models here")
    parser.add_argument("--results-dir", default=_common.RESULTS_DIR,
                        help="where the JSON goes (default: benchmarks/results)")
    args = parser.parse_args()
    resolve_speed_arguments(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    onnx, ort = require_onnx(), require_onnxruntime()
    try:
        ov = None if args.no_openvino else require_openvino()
    except ImportError:
        ov = None
    nncf = None if ov is None or args.no_nncf else _nncf()
    args.openvino, args.nncf = ov is not None, nncf is not None
    _common.RESULTS_DIR = args.results_dir  # write_json writes there

    print("machine:", machine())
    workdir = args.workdir or tempfile.mkdtemp(prefix="onnx_export_bench_")
    rng = np.random.RandomState(1)
    rows, infos = [], {}
    for name in args.models:
        paths, info, samples, reference = prepare_model(name, workdir, args)
        info["kernels"] = int8_kernels(paths)
        info["agreement"] = agreement(paths, samples, reference, args.threads[-1])
        infos[name] = info
        kernels = info["kernels"]
        print(f"{name}: {info['int8_layers']} int8 layers; int8/float compute nodes: "
              + ", ".join(f"{r} {k['int8_compute']}/{k['float_compute']}" for r, k in kernels.items())
              + f"; peer preprocess: {info['peer']['preprocess']}; Paddle self-check {info['check']}", flush=True)
        for threads in args.threads:
            for batch_size in args.batches:
                row = speed_row(name, paths, threads, batch_size, args, rng)
                rows.append(row)
                print("  " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "model"), flush=True)
    print_tables(args, rows, infos)
    payload = {"command": "python benchmarks/onnx_export.py " + " ".join(sys.argv[1:]), "quick": args.quick,
               "target": args.target, "clip_activations": args.clip, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
               "paddle2onnx_opset": OPSET, "peer": {"quant_format": "QDQ", "per_channel": True,
                                                    "calibrate_method": "MinMax",
                                                    "preprocess": not args.no_preprocess,
                                                    "variants": {k: list(v) for k, v in PEERS.items()}},
               "openvino": ov.__version__ if ov else None, "nncf": nncf.__version__ if nncf else None,
               "rounds": args.rounds, "iters": args.iters, "models": infos, "rows": rows}
    name = "onnx_export" + ("_quick" if args.quick else "") + ("_4archs" if len(args.models) == 4 else "")
    name += "" if args.target == "portable" else f"_target_{args.target}"
    print("results:", write_json(f"{name}_{machine()['int8_isa']}", payload))


if __name__ == "__main__":
    main()
