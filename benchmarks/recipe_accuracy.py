"""Accuracy of every quantization method on real data, measured on the deployed model.

    python benchmarks/recipe_accuracy.py mobilenet_v1
    python benchmarks/recipe_accuracy.py resnet18
    python benchmarks/recipe_accuracy.py resnet18 --max-steps 40 --qat-max-steps 10 --val-batches 4   # smoke run

For one architecture of ``recipes/`` on the default data (Fashion-MNIST, real 28x28 images, as an
ImageNet-style folder) this trains the FP32 model once with the recipe's defaults, then starts
every method from those weights, each through ``python -m recipes.run`` with ``--pretrained``:

* PTQ with each activation calibrator: KL, Hist, Absmax, MSE (per-channel absmax weights, 8 bits);
* QAT int8 (moving-average activation scales, per-channel weights);
* QAT with PACT activations and 4-bit weights (W4A8);
* dynamic weight-only int8.

Every model is exported and evaluated **through Paddle Inference** on the 10,000 test images
(int8 oneDNN kernels for PTQ/QAT; the FP32 predictor for FP32 and dynamic), next to the simulated
dygraph model. The table shows the deployed top-1, its drop vs the deployed FP32 model, the
simulated top-1 and the top-1 agreement between the deployed and the simulated model.

QAT trains more steps than the FP32 model had, and a short FP32 run is not converged, so QAT's
drop vs FP32 mixes two effects: quantization and extra training. The row ``FP32 +QAT steps``
separates them: the FP32 model fine-tuned with QAT's steps, learning rate and schedule, without
quantization; the QAT rows also report their drop against it (``drop vs control``).
Results: ``benchmarks/results/recipe_accuracy_<arch>.json``. ``--reuse`` keeps every finished
method's ``results.json`` under ``--out`` and runs only the missing ones.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import print_table, write_json  # noqa: E402
from recipes import run as recipe  # noqa: E402
from recipes.archs import ARCHS  # noqa: E402

VARIANTS: list[tuple[str, str, list[str]]] = [
    ("PTQ KL", "ptq", ["--calibrator", "KLQuantizer"]),
    ("PTQ Hist", "ptq", ["--calibrator", "HistQuantizer"]),
    ("PTQ Absmax", "ptq", ["--calibrator", "AbsmaxQuantizer"]),
    ("PTQ MSE", "ptq", ["--calibrator", "MSEQuantizer"]),
    ("QAT int8", "qat", []),
    ("QAT PACT W4A8", "qat", ["--pact", "--weight-bits", "4"]),
    ("dynamic int8", "dynamic", ["--dynamic-bits", "8"]),
]
GOALS = {"PTQ": 0.3, "QAT int8": 0.1, "QAT PACT W4A8": 1.0}
CONTROL = "FP32 +QAT steps"  # FP32 fine-tuned exactly like QAT, without quantization


def run_method(arch: str, method: str, out: str, extra: list[str], common: list[str],
               reuse: bool = False) -> dict[str, Any]:
    """One ``recipes.run`` call; returns its ``results.json``."""
    finished = os.path.join(out, arch, method, "results.json")
    if reuse and os.path.isfile(finished):
        with open(finished) as handle:
            return json.load(handle)
    argv = [arch, method, "--out", out, *common, *extra]
    print(f"$ python -m recipes.run {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        recipe.main(argv)
    with open(os.path.join(out, arch, method, "results.json")) as handle:
        result = json.load(handle)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(ARCHS))
    parser.add_argument("--out", default="bench_runs/recipe_accuracy")
    parser.add_argument("--max-steps", type=int, help="FP32 steps (default: the recipe's)")
    parser.add_argument("--qat-max-steps", type=int, help="QAT steps (default: the recipe's)")
    parser.add_argument("--val-batches", type=int, help="evaluate on the first N test batches only")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--reuse", action="store_true", help="keep finished methods' results, run the missing ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the runs after FP32 (data order, init)")
    parser.add_argument("--fp32-from", help="the --out of an earlier run: start from its FP32 model instead of training one")
    parser.add_argument("--methods", nargs="+", choices=["ptq", "qat", "dynamic"], default=["ptq", "qat", "dynamic"])
    parser.add_argument("--json-name", help="results file name (default recipe_accuracy_<arch>)")
    args = parser.parse_args()

    common: list[str] = []
    for flag, value in (("--val-batches", args.val_batches), ("--image-size", args.image_size),
                        ("--threads", args.threads)):
        if value is not None:
            common += [flag, str(value)]
    out = os.path.abspath(args.out)
    base_out = os.path.join(os.path.abspath(args.fp32_from) if args.fp32_from else out, "fp32")
    weights = os.path.join(base_out, args.arch, "fp32", "net.pdparams")

    defaults = ARCHS[args.arch].fashion
    qat_steps = args.qat_max_steps or defaults.qat_max_steps
    rows: dict[str, dict[str, Any]] = {}
    fp32_extra = ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
    rows["FP32"] = run_method(args.arch, "fp32", base_out, fp32_extra, common, args.reuse or bool(args.fp32_from))
    common += ["--seed", str(args.seed)]
    if "qat" in args.methods:
        control = ["--pretrained", weights, "--lr", str(defaults.qat_lr), "--max-steps", str(qat_steps)]
        rows[CONTROL] = run_method(args.arch, "fp32", os.path.join(out, "fp32_control"), control, common, args.reuse)
    for label, method, extra in VARIANTS:
        if method not in args.methods:
            continue
        variant_out = os.path.join(out, label.lower().replace(" ", "_"))
        steps = ["--qat-max-steps", str(qat_steps)] if method == "qat" else []
        rows[label] = run_method(args.arch, method, variant_out, ["--pretrained", weights, *extra, *steps], common,
                                 args.reuse)

    base = rows["FP32"]["deployed_top1"]
    table = []
    for label, row in rows.items():
        drop = None if label == "FP32" else round((base - row["deployed_top1"]) * 100, 2)
        vs_control = round((rows[CONTROL]["deployed_top1"] - row["deployed_top1"]) * 100, 2) if label.startswith("QAT") else ""
        goal = next((g for prefix, g in GOALS.items() if label.startswith(prefix)), None)
        table.append([label, row["deployed_top1"], "" if drop is None else drop, vs_control, row["simulated_top1"],
                      "" if label.startswith("FP32") else row["agreement_top1"], "" if goal is None else goal,
                      row.get("steps", ""), round(row.get("wall_seconds", 0))])
    print(f"\n{args.arch} on Fashion-MNIST ({args.image_size or defaults.image_size}px), "
          f"{rows['FP32']['images']} test images, deployed through Paddle Inference")
    print_table(["method", "deployed top-1", "drop pt", "drop vs control", "simulated top-1", "agreement",
                 "goal drop pt", "train steps", "wall s"], table)
    path = write_json(args.json_name or f"recipe_accuracy_{args.arch}", {
        "command": "python benchmarks/recipe_accuracy.py " + " ".join(sys.argv[1:]),
        "arch": args.arch, "seed_after_fp32": args.seed,
        "settings": {"image_size": args.image_size or defaults.image_size, "width": defaults.width,
                     "fp32_steps": rows["FP32"].get("steps"), "qat_steps": qat_steps, "qat_lr": defaults.qat_lr,
                     "calib_batches": defaults.calib_batches, "batch_size": defaults.batch_size,
                     "val_batches": args.val_batches},
        "rows": {label: {k: row.get(k) for k in ("deployed_top1", "simulated_top1", "agreement_top1", "rel_l2",
                                                  "int8_ops", "steps", "params_ratio", "wall_seconds")}
                 for label, row in rows.items()},
        "drop_pt": {label: round((base - row["deployed_top1"]) * 100, 2) for label, row in rows.items() if label != "FP32"},
        "qat_drop_vs_control_pt": {label: round((rows[CONTROL]["deployed_top1"] - row["deployed_top1"]) * 100, 2)
                                   for label, row in rows.items() if label.startswith("QAT")},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
