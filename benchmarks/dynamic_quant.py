"""Dynamic (weight-only) quantization on real data: file size and accuracy through Paddle Inference.

    python benchmarks/dynamic_quant.py [--steps 400] [--threads 2] [--mkldnn]

Trains the examples' small CNN (two conv blocks, two-Linear head) for ``--steps`` batches of 64
Fashion-MNIST images, exports it as a legacy inference model, quantizes its weights to int8 and
int16 with ``quant_post_dynamic`` (conv and Linear, per channel), then runs the three models with
Paddle Inference on the 10,000 test images. Reports params-file size, top-1 accuracy, the drop vs
FP32, top-1 agreement with FP32, the relative L2 distance of the logits and the median time per
batch of ``--eval-batch`` images.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import paddle
import paddle.inference as paddle_infer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import median, print_table, write_json  # noqa: E402
from _fashion import normalised, train  # noqa: E402
from qtrainer.quant.methods.dynamic import quant_post_dynamic  # noqa: E402


def run_inference(model_file: str, params_file: str, images: np.ndarray, batch: int, threads: int,
                  mkldnn: bool) -> tuple[np.ndarray, float]:
    """(logits of every image, median seconds per batch)."""
    config = paddle_infer.Config(model_file, params_file)
    config.disable_gpu()
    config.disable_glog_info()
    config.set_cpu_math_library_num_threads(threads)
    config.enable_mkldnn() if mkldnn else config.disable_mkldnn()
    predictor = paddle_infer.create_predictor(config)
    source = predictor.get_input_handle(predictor.get_input_names()[0])
    sink = predictor.get_output_handle(predictor.get_output_names()[0])
    outputs, times = [], []
    for start in range(0, len(images), batch):
        chunk = np.ascontiguousarray(images[start:start + batch])
        source.reshape(chunk.shape)
        source.copy_from_cpu(chunk)
        began = time.perf_counter()
        predictor.run()
        times.append(time.perf_counter() - began)
        outputs.append(sink.copy_to_cpu())
    return np.concatenate(outputs), median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-batch", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mkldnn", action="store_true", help="run Paddle Inference with oneDNN")
    args = parser.parse_args()

    began = time.perf_counter()
    net = train(args.steps, args.batch_size, args.lr)
    train_seconds = time.perf_counter() - began
    test_images, test_labels = normalised("test")

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        fp32_dir = os.path.join(workdir, "fp32")
        with paddle.pir_utils.DygraphOldIrGuard():
            paddle.jit.save(net, os.path.join(fp32_dir, "model"),
                            input_spec=[paddle.static.InputSpec([None, 1, 28, 28], "float32", "image")])
        models = {"fp32": (os.path.join(fp32_dir, "model.pdmodel"), os.path.join(fp32_dir, "model.pdiparams"))}
        reports = {}
        for bits in (8, 16):
            report = quant_post_dynamic(fp32_dir, os.path.join(workdir, f"int{bits}"), weight_bits=bits)
            models[f"int{bits}"] = (report["output"]["model"], report["output"]["params"])
            reports[f"int{bits}"] = report

        fp32_bytes = os.path.getsize(models["fp32"][1])
        reference = None
        for name, (model_file, params_file) in models.items():
            logits, seconds = run_inference(model_file, params_file, test_images, args.eval_batch, args.threads,
                                            args.mkldnn)
            if reference is None:
                reference = logits
            predicted = logits.argmax(-1)
            size = os.path.getsize(params_file)
            accuracy = float((predicted == test_labels).mean() * 100)
            results[name] = {
                "params_bytes": size, "params_ratio": size / fp32_bytes, "accuracy_pct": accuracy,
                "agreement_with_fp32_pct": float((predicted == reference.argmax(-1)).mean() * 100),
                "logits_relative_l2": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
                "ms_per_batch": seconds * 1000,
            }
            if name in reports:
                results[name]["quantized_weights"] = [
                    {k: q[k] for k in ("name", "op_types", "shape", "axis", "relative_error")}
                    for q in reports[name]["quantized"]]
                results[name]["skipped_weights"] = reports[name]["skipped"]
    for name, r in results.items():
        r["accuracy_drop_pt"] = results["fp32"]["accuracy_pct"] - r["accuracy_pct"]
        rows.append([name, r["params_bytes"], r["params_ratio"], r["accuracy_pct"], r["accuracy_drop_pt"],
                     r["agreement_with_fp32_pct"], r["logits_relative_l2"], r["ms_per_batch"]])

    print(f"small CNN trained {args.steps} steps x {args.batch_size} in {train_seconds:.0f} s; "
          f"Paddle Inference on 10,000 test images, {args.threads} threads, oneDNN {'on' if args.mkldnn else 'off'}")
    print_table(["model", "params bytes", "ratio", "top-1 %", "drop pt", "agree %", "logits rel L2",
                 f"ms/{args.eval_batch}"], rows)
    path = write_json("dynamic_quant", {
        "settings": {**vars(args), "train_seconds": train_seconds, "test_images": len(test_labels)},
        "results": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
