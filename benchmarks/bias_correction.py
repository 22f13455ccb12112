"""PTQ with and without empirical bias correction, deployed int8, on the recipe's MobileNetV1.

    python benchmarks/bias_correction.py                        # trains the recipe's FP32 model first
    python benchmarks/bias_correction.py --fp32 recipe_runs/mobilenet_v1/fp32/net.pdparams

Model: ``recipes.run mobilenet_v1`` on Fashion-MNIST (32 px, the recipe's default width 0.25; its
FP32 stage is run into ``--out`` when ``--fp32`` is not given). For weight bits 8 and 6 (activations 8, KL
calibration, per-channel weights, Conv+BN folded), the same FP32 model goes through
``PTQ.quantize(fuse=True)``, ``calibrate`` on the recipe's calibration batches and ``freeze``;
with bias correction, ``correct_bias`` on the first ``--bias-batches`` of those batches. Each
model is exported (``save_quantized_model``, self-check on) and run in Paddle Inference int8 on the
whole test set. Reported: FP32 top-1 (Paddle Inference float), simulated and deployed top-1, the
drop of the deployed model vs FP32 in points, agreement deployed vs simulated.
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
from qtrainer.quant import PTQ, correct_bias  # noqa: E402
from qtrainer.quant.export.inference import create_predictor, load_int8_predictor  # noqa: E402
from qtrainer.quant.export.samples import first_inputs  # noqa: E402
from qtrainer.quant.methods.ptq import calibrate  # noqa: E402
from recipes import run as recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", help="FP32 weights of the recipe's mobilenet_v1 (default: train them into --out)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the FP32 stage is trained when --fp32 is not given")
    parser.add_argument("--weight-bits", type=int, nargs="+", default=[8, 6])
    parser.add_argument("--bias-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_num_threads(args.threads)

    settings, fp32, train, val = recipe_fp32(args.fp32, args.out)
    spec = recipe.input_spec(settings)
    work = tempfile.mkdtemp(prefix="bias_correction_")
    fp32_prefix = os.path.join(work, "fp32")
    recipe.export_fp32(fp32, fp32_prefix, spec)
    reference, labels = logits_of(fp32, val)
    fp32_deployed = deployed_logits(create_predictor(fp32_prefix, int8=False, num_threads=args.threads), val)
    fp32_top1 = float((fp32_deployed.argmax(1) == labels).mean())
    calib = [batch for _, batch in zip(range(settings.calib_batches), train)]
    samples = first_inputs(val, 4)

    rows, results = [], []
    for bits in args.weight_bits:
        for corrected in (False, True):
            began = time.perf_counter()
            ptq = PTQ(activation_quantizer="KLQuantizer", weight_bits=bits)
            model = ptq.quantize(copy.deepcopy(fp32), fuse=True)
            calibrate(model, calib)
            ptq.freeze(model)
            shifts = correct_bias(model, [b[0] for b in calib[: args.bias_batches]]) if corrected else None
            simulated, _ = logits_of(model, val)
            prefix = os.path.join(work, f"w{bits}_{'bc' if corrected else 'plain'}")
            report = ptq.save_quantized_model(model, prefix, input_spec=spec, sample_inputs=samples, on_failure="write")
            predictor, _ = load_int8_predictor(prefix, num_threads=args.threads)
            deployed = deployed_logits(predictor, val)
            entry = {
                "weight_bits": bits, "bias_correction": corrected,
                "simulated_top1": float((simulated.argmax(1) == labels).mean()),
                "deployed_top1": float((deployed.argmax(1) == labels).mean()),
                "agreement": float((deployed.argmax(1) == simulated.argmax(1)).mean()),
                "simulated_vs_fp32_agreement": float((simulated.argmax(1) == reference.argmax(1)).mean()),
                "check_passed": report.passed, "kept_float": report.kept_float,
                "corrected_layers": None if shifts is None else len(shifts.corrected),
                "seconds": round(time.perf_counter() - began, 1),
            }
            entry["drop_pt"] = round(100 * (fp32_top1 - entry["deployed_top1"]), 2)
            results.append(entry)
            rows.append([f"W{bits}A8", "yes" if corrected else "no", entry["simulated_top1"], entry["deployed_top1"],
                         entry["drop_pt"], entry["agreement"], len(report.kept_float)])
            print(rows[-1], flush=True)
    print(f"\nMobileNetV1 x{settings.width} on Fashion-MNIST ({settings.image_size} px), FP32 deployed top-1 "
          f"{fp32_top1:.4f}, {len(labels)} test images; KL PTQ on {settings.calib_batches} batches")
    print_table(["weights", "bias corr.", "sim top-1", "deployed top-1", "drop pt", "agree", "float layers"], rows)
    print("results:", write_json("bias_correction", {
        "command": "python " + " ".join(sys.argv), "fp32_top1": fp32_top1, "images": int(len(labels)),
        "width": settings.width, "image_size": settings.image_size, "calib_batches": settings.calib_batches,
        "bias_batches": args.bias_batches, "rows": results,
    }))


if __name__ == "__main__":
    main()
