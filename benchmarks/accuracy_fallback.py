"""The accuracy-aware fallback (``max_drop``) on a low-bit PTQ of the recipe's MobileNetV1, deployed int8.

    python benchmarks/accuracy_fallback.py --fp32 /tmp/qtrainer_bias_correction/mobilenet_v1/fp32/net.pdparams
    python benchmarks/accuracy_fallback.py --weight-bits 4 --max-drop 0.005 --eval-batches 20

Model: the recipe's FP32 MobileNetV1 (``benchmarks/_recipe_fp32.py``: 32 px Fashion-MNIST, the
recipe's default width 0.25; trained first when ``--fp32`` is not given). ``PTQ(KLQuantizer, weight_bits=--weight-bits)``
with Conv+BN folded, calibrated on the recipe's calibration batches, is exported twice: all int8,
and with ``export_quantized_model(..., max_drop=--max-drop, eval_loader=<the first --eval-batches
test batches>)``. Both deployed models (Paddle Inference int8) are then scored on the whole test
set. Reported: float and deployed top-1 on the eval batches and on the whole test set, the layers
kept in float (in the order the fallback chose them), attempts, and int8-over-float speed-up of
the export's own speed check (batch 1, 1 thread) for all-int8 and for the chosen model.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import print_table, write_json  # noqa: E402
from _recipe_fp32 import DEFAULT_OUT, deployed_logits, logits_of, recipe_fp32  # noqa: E402
from qtrainer.device import set_num_threads  # noqa: E402
from qtrainer.quant import PTQ  # noqa: E402
from qtrainer.quant.export.inference import load_int8_predictor  # noqa: E402
from qtrainer.quant.export.samples import first_inputs  # noqa: E402
from qtrainer.quant.methods.ptq import calibrate  # noqa: E402
from recipes import run as recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", help="FP32 weights of the recipe's mobilenet_v1 (default: train them into --out)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the FP32 stage is trained when --fp32 is not given")
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--max-drop", type=float, default=0.005)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_num_threads(args.threads)

    settings, fp32, train, val = recipe_fp32(args.fp32, args.out)
    spec = recipe.input_spec(settings)
    float_logits, labels = logits_of(fp32, val)
    float_top1 = float((float_logits.argmax(1) == labels).mean())
    eval_loader = [batch for _, batch in zip(range(args.eval_batches), val)]
    calib = [batch for _, batch in zip(range(settings.calib_batches), train)]
    ptq = PTQ(activation_quantizer="KLQuantizer", weight_bits=args.weight_bits)
    model = ptq.quantize(copy.deepcopy(fp32), fuse=True)
    calibrate(model, calib)
    ptq.freeze(model)
    work = tempfile.mkdtemp(prefix="accuracy_fallback_")
    samples = first_inputs(val, 4)
    results = {}
    for label, kwargs in (("all int8", {}), (f"max_drop={args.max_drop:g}", {
            "max_drop": args.max_drop, "eval_loader": eval_loader})):
        began = time.perf_counter()
        prefix = os.path.join(work, "fallback" if kwargs else "all_int8")
        report = ptq.save_quantized_model(model, prefix, input_spec=spec, sample_inputs=samples, on_failure="write",
                                          **kwargs)
        predictor, _ = load_int8_predictor(prefix, num_threads=args.threads)
        deployed = deployed_logits(predictor, val)
        results[label] = {
            "deployed_top1": float((deployed.argmax(1) == labels).mean()),
            "kept_float": list(report.kept_float), "int8_layers": len(report.int8_layers),
            "speedup": (report.speed or {}).get("speedup"), "accuracy": report.accuracy,
            "seconds": round(time.perf_counter() - began, 1),
        }
        print(label, results[label]["deployed_top1"], results[label]["kept_float"], flush=True)
    rows = []
    for label, entry in results.items():
        acc = entry["accuracy"] or {}
        rows.append([label, acc.get("deployed_metric", ""), entry["deployed_top1"],
                     round(100 * (float_top1 - entry["deployed_top1"]), 2), len(entry["kept_float"]),
                     ", ".join(entry["kept_float"]) or "-", len(acc.get("attempts", [])) or "", entry["speedup"],
                     entry["seconds"]])
    fallback = results[f"max_drop={args.max_drop:g}"]["accuracy"]
    print(f"\nMobileNetV1 x{settings.width}, PTQ KL W{args.weight_bits}A8, {len(labels)} test images; float top-1 "
          f"{float_top1:.4f} (eval batches: {fallback['float_metric']:.4f} on {args.eval_batches} batches)")
    print_table(["export", "eval top-1", "test top-1", "test drop pt", "float layers", "which", "attempts",
                 "int8/fp32 speed", "s"], rows)
    print("results:", write_json(f"accuracy_fallback_w{args.weight_bits}", {
        "command": "python " + " ".join(sys.argv), "float_top1": float_top1, "images": int(len(labels)),
        "weight_bits": args.weight_bits, "max_drop": args.max_drop, "eval_batches": args.eval_batches,
        "results": results,
    }))


if __name__ == "__main__":
    main()
