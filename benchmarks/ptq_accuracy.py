"""PTQ accuracy per activation calibrator, deployed int8 through Paddle Inference, on real data.

    python benchmarks/ptq_accuracy.py                   # 800 training steps, 32 calibration batches
    python benchmarks/ptq_accuracy.py --steps 100 --calib-batches 4 --test-images 1000   # quick look

Model: the examples' small CNN (two conv -> BN -> ReLU -> pool blocks, Linear 1568-128, ReLU,
Linear 128-10), trained ``--steps`` Adam steps on Fashion-MNIST. For each activation calibrator
(KL, Hist, Absmax, MSE; per-channel absmax weights, 8 bits) the same trained model goes through
``PTQ(...).quantize(model, fuse=True)`` (Conv+BN folded), ``calibrate`` on the first
``--calib-batches`` batches of 64 training images, and ``save_quantized_model`` (the export
with its int8 self-check). The exported model then runs in Paddle Inference with oneDNN int8
on the 10,000 test images. Reported per calibrator: deployed top-1 and its drop vs the FP32
model (run through Paddle Inference too), the simulated (dygraph fake-quant) top-1, the top-1
agreement deployed vs simulated, the relative L2 distance of their logits, and how many ops
Paddle ran in int8. Goals: best drop <= 0.3 pt, agreement >= 99.5%.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import numpy as np
import paddle

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import print_table, write_json  # noqa: E402
from _fashion import dygraph_logits, normalised, train  # noqa: E402
from qtrainer.device import set_num_threads  # noqa: E402
from qtrainer.quant import PTQ  # noqa: E402
from qtrainer.quant.export.inference import create_predictor, load_int8_predictor, run_predictor  # noqa: E402
from qtrainer.quant.methods.ptq import calibrate  # noqa: E402

CALIBRATORS = ("KLQuantizer", "HistQuantizer", "AbsmaxQuantizer", "MSEQuantizer")
SPEC = [paddle.static.InputSpec([None, 1, 28, 28], "float32", "image")]


def deployed_logits(predictor, images: np.ndarray, batch: int) -> np.ndarray:
    return run_predictor(predictor, ([images[i:i + batch]] for i in range(0, len(images), batch)))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--calib-batches", type=int, default=32)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--eval-batch", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    set_num_threads(args.threads)

    began = time.perf_counter()
    net = train(args.steps, 64, args.lr)
    train_seconds = time.perf_counter() - began
    train_images, _ = normalised("train")
    calib = [(paddle.to_tensor(train_images[i * 64:(i + 1) * 64]),) for i in range(args.calib_batches)]
    test_images, test_labels = normalised("test")
    test_images, test_labels = test_images[:args.test_images], test_labels[:args.test_images]

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        fp32_prefix = os.path.join(workdir, "fp32", "model")
        with paddle.pir_utils.DygraphOldIrGuard():
            paddle.jit.save(net, fp32_prefix, input_spec=SPEC)
        fp32 = deployed_logits(create_predictor(fp32_prefix, int8=False, num_threads=args.threads), test_images,
                               args.eval_batch)
        fp32_top1 = float((fp32.argmax(1) == test_labels).mean())
        results["FP32"] = {"deployed_top1": fp32_top1,
                           "simulated_top1": float((dygraph_logits(net, test_images, args.eval_batch).argmax(1)
                                                    == test_labels).mean())}
        for name in CALIBRATORS:
            ptq = PTQ(activation_quantizer=name)
            started = time.perf_counter()
            model = ptq.quantize(net, fuse=True)
            calibrate(model, calib)
            prefix = os.path.join(workdir, name, "model")
            report = ptq.save_quantized_model(model, prefix, input_spec=SPEC, sample_inputs=[c[0] for c in calib[:4]])
            quantize_seconds = time.perf_counter() - started
            simulated = dygraph_logits(model, test_images, args.eval_batch)
            predictor, int8_ops = load_int8_predictor(prefix, num_threads=args.threads)
            deployed = deployed_logits(predictor, test_images, args.eval_batch)
            top1 = float((deployed.argmax(1) == test_labels).mean())
            results[name] = {
                "deployed_top1": top1,
                "drop_pt": round((fp32_top1 - top1) * 100, 2),
                "simulated_top1": float((simulated.argmax(1) == test_labels).mean()),
                "agreement_top1": float((deployed.argmax(1) == simulated.argmax(1)).mean()),
                "rel_l2": float(np.linalg.norm(deployed - simulated) / np.linalg.norm(simulated)),
                "int8_ops": dict(int8_ops),
                "fused_pairs": len(ptq.fused_pairs),
                "export_check_passed": report.passed,
                "quantize_calibrate_export_seconds": quantize_seconds,
            }

    rows = [[name, r["deployed_top1"], r.get("drop_pt", ""), r["simulated_top1"], r.get("agreement_top1", ""),
             r.get("rel_l2", ""), " ".join(f"{k}:{v}" for k, v in r.get("int8_ops", {}).items())]
            for name, r in results.items()]
    print(f"small CNN, {args.steps} training steps ({train_seconds:.0f} s); {args.calib_batches} calibration batches "
          f"of 64; {len(test_labels)} Fashion-MNIST test images through Paddle Inference (oneDNN, {args.threads} threads)")
    print_table(["model", "deployed top-1", "drop pt", "simulated top-1", "agreement", "logits rel L2", "int8 ops"], rows)
    best = min((r for k, r in results.items() if k != "FP32"), key=lambda r: r["drop_pt"])
    print(f"best drop {best['drop_pt']:.2f} pt (goal <= 0.3); lowest agreement "
          f"{min(r['agreement_top1'] for k, r in results.items() if k != 'FP32'):.4f} (goal >= 0.995)")
    path = write_json("ptq_accuracy", {
        "command": "python benchmarks/ptq_accuracy.py " + " ".join(sys.argv[1:]),
        "settings": {**vars(args), "train_seconds": train_seconds, "test_images": len(test_labels)},
        "results": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
