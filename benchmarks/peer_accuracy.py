"""Deployed accuracy of our trained int8 exports against the runtimes' own PTQ of the same FP32 model.

    python -m recipes.run mobilenet_v1 all --export onnx openvino     # the trained models first
    python benchmarks/peer_accuracy.py                                # mobilenet_v1 under recipe_runs/
    python benchmarks/peer_accuracy.py --runs DIR --arch resnet18

Reads the recipe's FP32 export (``<runs>/<arch>/fp32/export/model``) and our PTQ and QAT exports
(``<runs>/<arch>/{ptq,qat}/export/model.onnx`` and ``.xml``), and quantizes the FP32 model the
peers' way on the same number of training batches as the recipe's PTQ calibration
(``--calib-batches``, default the recipe's; the first batches of the recipe's training loader):

* onnxruntime ``quantize_static`` of the FP32 ONNX (paddle2onnx), QDQ, per channel, MinMax, U8S8
  and S8S8 (``onnx_export.peer_models``);
* OpenVINO + NNCF ``nncf.quantize`` of the FP32 model converted by OpenVINO (``deploy_speed.nncf_model``).

Then every model's top-1 on the recipe's whole validation set (Fashion-MNIST: the 10,000 test
images), each on its runtime (1 thread). The goals (issues 11, 12): our OpenVINO accuracy at
least NNCF's, our onnxruntime accuracy at least the peer's. Results:
``benchmarks/results/peer_accuracy_<arch>_<int8 ISA>.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import machine, print_table, write_json  # noqa: E402
from deploy_speed import _nncf, nncf_model  # noqa: E402
from onnx_export import paddle2onnx_fp32, peer_models  # noqa: E402
from qtrainer.quant.export.onnx import load_onnxruntime, run_onnxruntime  # noqa: E402
from qtrainer.quant.export.openvino import load_openvino, require_openvino, run_openvino  # noqa: E402
from recipes import run as recipe  # noqa: E402


def _batches(loader, limit: int | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, labels = [], []
    for index, (x, y) in enumerate(loader):
        if limit is not None and index >= limit:
            break
        images.append(x.numpy())
        labels.append(y.numpy().reshape(-1))
    return images, labels


def _top1(run, images: list[np.ndarray], labels: list[np.ndarray]) -> float:
    hits = sum(int((np.asarray(run(x)).argmax(1) == y).sum()) for x, y in zip(images, labels))
    return hits / sum(len(y) for y in labels)


def _runner(path: str):
    if path.endswith(".onnx"):
        session = load_onnxruntime(path, num_threads=1)
        return lambda x: run_onnxruntime(session, [x])[0]
    compiled = load_openvino(path, num_threads=1)
    return lambda x: run_openvino(compiled, [x])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="recipe_runs", help="the recipes' --out directory (default: recipe_runs)")
    parser.add_argument("--arch", default="mobilenet_v1", choices=sorted(recipe.ARCHS))
    parser.add_argument("--calib-batches", type=int, default=None, help="peer calibration batches (default: the recipe's)")
    parser.add_argument("--workdir", default=None, help="keep the peers' models here")
    args = parser.parse_args()
    require_openvino()
    if _nncf() is None:
        raise SystemExit("peer_accuracy needs nncf (pip install nncf)")
    settings = recipe.parse_args([args.arch, "ptq", "--out", args.runs])
    base = os.path.join(args.runs, args.arch)
    ours = {f"{runtime}_{method}": os.path.join(base, method, "export", "model" + suffix)
            for method in ("ptq", "qat") for runtime, suffix in (("ort", ".onnx"), ("ov", ".xml"))}
    missing = [p for p in ours.values() if not os.path.isfile(p)]
    fp32_prefix = os.path.join(base, "fp32", "export", "model")
    if missing or not os.path.isfile(fp32_prefix + ".pdmodel"):
        raise SystemExit(f"missing {missing or [fp32_prefix + '.pdmodel']}: run "
                         f"`python -m recipes.run {args.arch} all --export onnx openvino --out {args.runs}` first")
    train, val, _ = recipe.build_loaders(settings)
    calib_count = args.calib_batches or settings.calib_batches
    calibration, _ = _batches(train, calib_count)
    images, labels = _batches(val, settings.val_batches)
    workdir = args.workdir or tempfile.mkdtemp(prefix="peer_accuracy_")
    os.makedirs(workdir, exist_ok=True)
    fp32_onnx = os.path.join(workdir, "fp32.onnx")
    paddle2onnx_fp32(fp32_prefix, fp32_onnx)
    peers, info = peer_models(fp32_onnx, workdir, preprocess=True, batches=calibration)
    ov = require_openvino()
    fp32_xml = os.path.join(workdir, "ov_fp32.xml")
    ov.save_model(ov.convert_model(fp32_onnx), fp32_xml, compress_to_fp16=False)
    models = {"ort_fp32": fp32_onnx, **{k: ours[k] for k in ("ort_ptq", "ort_qat")}, **peers,
              "ov_fp32": fp32_xml, **{k: ours[k] for k in ("ov_ptq", "ov_qat")},
              "ov_nncf": nncf_model(fp32_xml, os.path.join(workdir, "ov_nncf.xml"), batches=calibration)}
    top1 = {name: _top1(_runner(path), images, labels) for name, path in models.items()}
    best_peer = max(top1["peer_u8s8"], top1["peer_s8s8"])
    rows = [[name, f"{value:.4f}", f"{100 * (value - top1['ort_fp32' if not name.startswith('ov') else 'ov_fp32']):+.2f}"]
            for name, value in top1.items()]
    print(f"# {machine()['cpu']}, int8 ISA {machine()['int8_isa']}; {args.arch}, {sum(len(y) for y in labels)} "
          f"validation images; peers calibrated on {calib_count} training batches")
    print_table(["model", "top-1", "pt vs fp32 (same runtime)"], rows)
    verdict = {
        "ort_ptq_vs_best_peer_pt": round(100 * (top1["ort_ptq"] - best_peer), 2),
        "ort_qat_vs_best_peer_pt": round(100 * (top1["ort_qat"] - best_peer), 2),
        "ov_ptq_vs_nncf_pt": round(100 * (top1["ov_ptq"] - top1["ov_nncf"]), 2),
        "ov_qat_vs_nncf_pt": round(100 * (top1["ov_qat"] - top1["ov_nncf"]), 2),
    }
    print(", ".join(f"{k} {v:+.2f}" for k, v in verdict.items()))
    payload: dict[str, Any] = {"machine": machine(), "command": " ".join(["python benchmarks/peer_accuracy.py", *sys.argv[1:]]),
                               "arch": args.arch, "images": sum(len(y) for y in labels), "calib_batches": calib_count,
                               "top1": top1, "verdict": verdict, "peer_info": info}
    print("results:", write_json(f"peer_accuracy_{args.arch}_{machine()['int8_isa']}", payload))


if __name__ == "__main__":
    main()
