"""Deployment speed of the int8 export: Paddle Inference vs OpenVINO (and OpenVINO + NNCF) on CPU.

    python benchmarks/deploy_speed.py                   # MobileNetV1/V2, ResNet18/50; batch 1, 8; threads 1, 2
    python benchmarks/deploy_speed.py --quick           # smoke run: MobileNetV1, batch 1, 1 thread
    python benchmarks/deploy_speed.py --models ResNet18 --batches 8 --threads 2 --rounds 9

The models are those of ``benchmarks/qat_export.py`` (``build_speed_models``: ``paddle.vision``
models with random weights at 224 px, batch-norm statistics from one random batch, ``QAT`` scales
observed on three random batches, exported with ``export_quantized_model``; the FP32 model saved
with ``paddle.jit.save``). Each one runs in five ways:

* Paddle Inference fp32 and int8 (oneDNN, ``qtrainer.quant.export.inference``);
* OpenVINO fp32 (the FP32 Paddle model converted) and OpenVINO int8 from our export
  (``qtrainer.quant.export.openvino.write_openvino``: since 2026-12-04 through our ONNX QDQ
  conversion, before that OpenVINO's Paddle frontend on the ``.pdmodel``; OpenVINO decides itself
  which nodes run int8 -- the table's ``ov int8 nodes`` column counts them);
* OpenVINO + NNCF int8 (``nncf.quantize`` of the OpenVINO fp32 model, ``target_device=CPU``,
  calibrated on the same three random batches as our QAT scales), when ``nncf`` is installed.

For each batch size and thread count every runtime is timed in alternation (``--rounds`` rounds of
``--iters`` runs each, after two warm-up runs); a latency is the median over the rounds and a
ratio the median of the per-round ratios (other processes share the CPU, so only interleaved
ratios are meaningful): int8 speed-up over the same runtime's fp32, and NNCF's latency over ours
(``ours vs nncf`` > 1: our export runs faster in OpenVINO). OpenVINO runs with the settings of
``load_openvino`` (latency hint, one stream, fp32 inference precision, no thread pinning), compiled
for the static batch size timed (a few percent faster than the exported free batch dimension);
Paddle Inference keeps the free batch dimension (it has no such option).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    SPEED_MODELS, add_speed_arguments, machine, median, print_table, resolve_speed_arguments, write_json,
)
from qat_export import build_speed_models  # noqa: E402
from qtrainer.quant.export.inference import create_predictor, load_int8_predictor, predict  # noqa: E402
from qtrainer.quant.export.openvino import (  # noqa: E402
    load_openvino,
    require_openvino,
    runtime_precisions,
    write_openvino,
)

MODELS = SPEED_MODELS
RUNTIMES = ["paddle_fp32", "paddle_int8", "ov_fp32", "ov_int8", "nncf_int8"]


def _nncf() -> Any | None:
    try:
        import nncf
    except ImportError:
        return None
    return nncf


def calibration_batches() -> list[np.ndarray]:
    """The three random batches ``qat_export.build_speed_models`` observes its QAT scales on.

    Same generator and seed; ``build_speed_models`` does not return them.
    """
    rng = np.random.RandomState(0)
    return [rng.standard_normal([8, 3, 224, 224]).astype("float32") for _ in range(3)]


def nncf_model(fp32_xml: str, out_xml: str, batches: list[np.ndarray] | None = None) -> str:
    """``nncf.quantize`` of the OpenVINO fp32 model on ``batches`` (default: the calibration
    batches), saved at ``out_xml``."""
    ov, nncf = require_openvino(), _nncf()
    batches = calibration_batches() if batches is None else batches
    model = ov.Core().read_model(fp32_xml)
    quantized = nncf.quantize(model, nncf.Dataset(batches), target_device=nncf.TargetDevice.CPU,
                              subset_size=len(batches))
    ov.save_model(quantized, out_xml, compress_to_fp16=False)
    return out_xml


def _openvino_runner(compiled) -> Callable[[np.ndarray], Any]:
    request = compiled.create_infer_request()
    return lambda batch: request.infer([batch])


def _paddle_runner(predictor) -> Callable[[np.ndarray], Any]:
    return lambda batch: predict(predictor, batch)


def _time_runs(run: Callable[[np.ndarray], Any], batch: np.ndarray, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        run(batch)
    return (time.perf_counter() - start) / iters * 1000.0


def prepare_model(name: str, workdir: str, clip, use_nncf: bool, target: str = "portable") -> tuple[dict[str, str], dict]:
    """Build and export ``name``; write its OpenVINO models. Returns ``({runtime: model path}, info)``."""
    fp32_prefix, int8_prefix, info = build_speed_models(name, workdir, clip, target)
    paths = {"paddle_fp32": fp32_prefix, "paddle_int8": int8_prefix,
             "ov_fp32": write_openvino(fp32_prefix)[0], "ov_int8": write_openvino(int8_prefix)[0]}
    info["bytes"] = {"ov_fp32_bin": os.path.getsize(fp32_prefix + ".bin"),
                     "ov_int8_bin": os.path.getsize(int8_prefix + ".bin")}
    if use_nncf:
        start = time.perf_counter()
        paths["nncf_int8"] = nncf_model(paths["ov_fp32"], os.path.join(workdir, name, "nncf_int8.xml"))
        info["nncf_seconds"] = round(time.perf_counter() - start, 1)
        info["bytes"]["nncf_int8_bin"] = os.path.getsize(paths["nncf_int8"][: -len(".xml")] + ".bin")
    _, counts = load_int8_predictor(int8_prefix)
    info["paddle_int8_ops"] = sum(counts.values())
    for runtime in ("ov_int8", "nncf_int8"):
        if runtime in paths:
            info[f"{runtime}_precisions"] = runtime_precisions(load_openvino(paths[runtime]))["summary"]
    return paths, info


def load_runners(paths: dict[str, str], threads: int, batch_size: int) -> dict[str, Callable[[np.ndarray], Any]]:
    """A run function per runtime; the OpenVINO models compiled for a static ``batch_size``."""
    runners = {}
    for runtime, path in paths.items():
        if runtime.startswith("paddle"):
            predictor = create_predictor(path, int8=runtime.endswith("int8"), num_threads=threads)
            runners[runtime] = _paddle_runner(predictor)
        else:
            runners[runtime] = _openvino_runner(load_openvino(path, num_threads=threads, batch_size=batch_size))
    return runners


def time_interleaved(runners: dict[str, Callable], batch: np.ndarray, rounds: int,
                     iters: int) -> dict[str, list[float]]:
    """``{runtime: [ms per run of each round]}``, the runtimes timed one after another in each round."""
    for run in runners.values():  # warm-up: kernels are built on the first runs
        _time_runs(run, batch, 2)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name].append(_time_runs(run, batch, iters))
    return times


def _ratio(times: dict[str, list[float]], slow: str, fast: str) -> float | None:
    if slow not in times or fast not in times:
        return None
    return round(median([a / b for a, b in zip(times[slow], times[fast])]), 3)


def speed_rows(args, workdir: str) -> tuple[list[dict], dict]:
    use_nncf = _nncf() is not None and not args.no_nncf
    rng = np.random.RandomState(1)
    results, infos = [], {}
    for name in args.models:
        paths, info = prepare_model(name, workdir, args.clip, use_nncf, args.target)
        infos[name] = info
        print(f"{name}: {info['int8_layers']} int8 layers, Paddle int8 ops {info['paddle_int8_ops']}, "
              f"OpenVINO (ours) {info['ov_int8_precisions']}"
              + (f", NNCF {info['nncf_int8_precisions']}" if use_nncf else ""), flush=True)
        for threads in args.threads:
            for batch_size in args.batches:
                runners = load_runners(paths, threads, batch_size)
                batch = rng.standard_normal([batch_size, 3, 224, 224]).astype("float32")
                times = time_interleaved(runners, batch, args.rounds, args.iters)
                row: dict[str, Any] = {"model": name, "batch": batch_size, "threads": threads}
                row.update({f"{r}_ms": round(median(times[r]), 2) for r in RUNTIMES if r in times})
                row.update(paddle_speedup=_ratio(times, "paddle_fp32", "paddle_int8"),
                           ov_speedup=_ratio(times, "ov_fp32", "ov_int8"),
                           nncf_speedup=_ratio(times, "ov_fp32", "nncf_int8"),
                           ours_vs_nncf=_ratio(times, "nncf_int8", "ov_int8"),
                           ov_int8_vs_paddle_int8=_ratio(times, "paddle_int8", "ov_int8"))
                results.append(row)
                print("  " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "model"), flush=True)
                del runners
    return results, infos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_speed_arguments(parser)
    parser.add_argument("--no-nncf", action="store_true", help="skip OpenVINO + NNCF even when nncf is installed")
    parser.add_argument("--workdir", default=None, help="keep the exported models here")
    args = parser.parse_args()
    resolve_speed_arguments(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ov = require_openvino()
    nncf = _nncf()

    print("machine:", machine())
    workdir = args.workdir or tempfile.mkdtemp(prefix="deploy_speed_bench_")
    rows, infos = speed_rows(args, workdir)
    headers = ["model", "batch", "threads", "pd fp32", "pd int8", "pd x", "ov fp32", "ov int8", "ov x",
               "nncf int8", "nncf x", "ours vs nncf"]
    keys = ["paddle_fp32_ms", "paddle_int8_ms", "paddle_speedup", "ov_fp32_ms", "ov_int8_ms", "ov_speedup",
            "nncf_int8_ms", "nncf_speedup", "ours_vs_nncf"]
    print(f"\nLatency in ms (224 px, median of {args.rounds} interleaved rounds of {args.iters} runs); "
          "x = speed-up over the same runtime's fp32; ours vs nncf > 1: our export is faster in OpenVINO")
    print_table(headers, [[r["model"], r["batch"], r["threads"]] + [r.get(k, "") if r.get(k) is not None else ""
                                                                   for k in keys] for r in rows])
    payload = {"command": "python benchmarks/deploy_speed.py " + " ".join(sys.argv[1:]), "quick": args.quick,
               "target": args.target, "clip_activations": args.clip, "openvino": ov.__version__,
               "nncf": None if nncf is None or args.no_nncf else nncf.__version__,
               "rounds": args.rounds, "iters": args.iters, "models": infos, "rows": rows}
    name = "deploy_speed" + ("_quick" if args.quick else "") + ("_4archs" if len(args.models) == 4 else "")
    name += "" if args.target == "portable" else f"_target_{args.target}"
    print("results:", write_json(f"{name}_{machine()['int8_isa']}", payload))


if __name__ == "__main__":
    main()
