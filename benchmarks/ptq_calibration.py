"""PTQ calibration cost: qtrainer's calibrators vs the FP32 forward, and vs Paddle's ``ImperativePTQ``.

    python benchmarks/ptq_calibration.py                 # 32 batches of 64, 5 interleaved rounds
    python benchmarks/ptq_calibration.py --quick         # 8 batches, 2 rounds

Model: a small CNN with a Linear head (two conv -> BN -> ReLU -> pool blocks, Linear 1568-128,
ReLU, Linear 128-10), trained for one epoch on Fashion-MNIST so that the activations are real.
The same N batches of training images (built once, as Tensors, so data loading is not timed)
go through:

* ``fp32``: the float model, eval mode, ``paddle.no_grad()`` -- the reference time.
* ``qtrainer <quantizer>``: ``PTQ(<quantizer>).quantize(model)`` (not fused, so the graph is the
  FP32 one), then ``calibrate(model, batches)`` (the forward passes with the calibrators
  observing every quantized layer's input) and ``freeze(model)`` (the thresholds). The goal is
  calibration + thresholds <= 1.5x the FP32 forward for ``KLQuantizer``.
* ``paddle <quantizer>``: ``paddle.quantization.ImperativePTQ(PTQConfig(<quantizer>(),
  PerChannelAbsmaxQuantizer()))``: ``quantize`` (forward hooks on every supported layer, which
  sample the inputs of Conv2D/Linear and the outputs of every layer), the same forward passes,
  then its threshold computation (``_cal_thresholds``, what its ``save_quantized_model`` runs
  first). Its ``HistQuantizer`` crashes under NumPy 2 (``float()`` of a shape-(1,) array); the
  benchmark patches that one line, here only.

Timing: the variants run in turn within each round (``--rounds`` rounds; other processes share
the CPU, so only interleaved measurements compare); each ratio is the median over rounds of the
per-round ratio to ``fp32``. Also reported: the KL thresholds of the Conv2D/Linear inputs from
both implementations, and the simulated (dygraph, fake-quant) top-1 accuracy of qtrainer's
frozen models on 2,000 test images -- for context, not the deployed int8 accuracy.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import median, print_table, write_json  # noqa: E402
from qtrainer.data import FashionMNISTDataset  # noqa: E402
from qtrainer.device import set_num_threads  # noqa: E402
from qtrainer.quant.methods.ptq import PTQ, calibrate, calibration_layers, freeze  # noqa: E402

QTRAINER_QUANTIZERS = ("KLQuantizer", "HistQuantizer", "MSEQuantizer", "AbsmaxQuantizer")
PADDLE_QUANTIZERS = ("KLQuantizer", "HistQuantizer", "AbsmaxQuantizer")


def small_cnn() -> nn.Layer:
    def block(cin: int, cout: int) -> list[nn.Layer]:
        return [nn.Conv2D(cin, cout, 3, padding=1, bias_attr=False), nn.BatchNorm2D(cout), nn.ReLU(),
                nn.MaxPool2D(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def train_one_epoch(images: int, batch_size: int = 64) -> nn.Layer:
    paddle.seed(0)
    np.random.seed(0)
    net = small_cnn()
    optimizer = paddle.optimizer.Adam(2e-3, parameters=net.parameters())
    loader = paddle.io.DataLoader(FashionMNISTDataset("train", limit=images), batch_size=batch_size, shuffle=True)
    net.train()
    for x, y in loader:
        loss = F.cross_entropy(net(x), y.reshape([-1]).astype("int64"))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    net.eval()
    return net


# ---------------------------------------------------------------------- Paddle's ImperativePTQ
def patch_paddle_hist_quantizer() -> None:
    """Paddle 3.3's HistQuantizer.cal_thresholds calls float() on a shape-(1,) array (NumPy 2 error)."""
    from paddle.quantization.imperative import ptq_quantizer

    def cal_thresholds(self):
        for idx in range(len(self.hists)):
            if self.hists[idx] is None:
                self.thresholds.append(self.abs_max_vals[idx])
                continue
            hist = self.hists[idx] / np.sum(self.hists[idx], dtype=np.float64)
            index = int(np.argwhere(np.cumsum(hist) >= self.hist_percent)[0][0])  # the fix: [0][0]
            self.thresholds.append(float((index - 0.5) * (self.abs_max_vals[idx] / hist.shape[0])))

    ptq_quantizer.HistQuantizer.cal_thresholds = cal_thresholds


def paddle_ptq(net: nn.Layer, name: str):
    from paddle.quantization import ImperativePTQ, PerChannelAbsmaxQuantizer, PTQConfig
    import paddle.quantization as q

    ptq = ImperativePTQ(PTQConfig(getattr(q, name)(), PerChannelAbsmaxQuantizer()))
    return ptq, ptq.quantize(net, inplace=False)


def paddle_input_thresholds(model: nn.Layer) -> dict[str, float]:
    out = {}
    for layer_name, layer in model.named_sublayers():
        config = getattr(layer, "_quant_config", None)
        if config is not None and config.enable_in_act_quantizer and config.in_act_quantizer.thresholds:
            out[layer_name] = float(config.in_act_quantizer.thresholds[0])
    return out


# ---------------------------------------------------------------------- timing
def forward_all(model: nn.Layer, batches: list[paddle.Tensor]) -> float:
    start = time.perf_counter()
    with paddle.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - start


def time_qtrainer(net: nn.Layer, name: str, batches: list[paddle.Tensor]) -> dict[str, float]:
    start = time.perf_counter()
    model = PTQ(name).quantize(net)
    quantize = time.perf_counter() - start
    start = time.perf_counter()
    calibrate(model, batches)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    freeze(model)
    thresholds = time.perf_counter() - start
    return {"quantize": quantize, "forward": forward, "thresholds": thresholds, "model": model}


def time_paddle(net: nn.Layer, name: str, batches: list[paddle.Tensor]) -> dict[str, float]:
    start = time.perf_counter()
    ptq, model = paddle_ptq(net, name)
    quantize = time.perf_counter() - start
    forward = forward_all(model, batches)
    start = time.perf_counter()
    ptq._cal_thresholds(model)
    thresholds = time.perf_counter() - start
    return {"quantize": quantize, "forward": forward, "thresholds": thresholds, "model": model}


def accuracy(model: nn.Layer, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with paddle.no_grad():
        pred = model(paddle.to_tensor(images)).numpy().argmax(-1)
    return float((pred == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="8 batches, 2 rounds, 2048 training images")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds, args.train_images = 8, 2, 2048
    logging.basicConfig(level=logging.WARNING)
    for name in ("qtrainer", "paddle"):
        logging.getLogger(name).setLevel(logging.WARNING)
    set_num_threads(args.threads)
    patch_paddle_hist_quantizer()

    net = train_one_epoch(args.train_images)
    train = FashionMNISTDataset("train", limit=args.batches * args.batch_size)
    batches = [paddle.to_tensor(train.images[i * args.batch_size:(i + 1) * args.batch_size])
               for i in range(args.batches)]
    test = FashionMNISTDataset("test", limit=2000)
    forward_all(net, batches[:2])  # warm-up

    names = ["fp32"] + [f"qtrainer {q}" for q in QTRAINER_QUANTIZERS] + [f"paddle {q}" for q in PADDLE_QUANTIZERS]
    times: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    last_models: dict[str, nn.Layer] = {}
    for _ in range(args.rounds):
        fp32 = forward_all(net, batches)
        times["fp32"].append({"forward": fp32, "thresholds": 0.0, "quantize": 0.0})
        for q in QTRAINER_QUANTIZERS:
            result = time_qtrainer(net, q, batches)
            last_models[f"qtrainer {q}"] = result.pop("model")
            times[f"qtrainer {q}"].append(result)
        for q in PADDLE_QUANTIZERS:
            result = time_paddle(net, q, batches)
            last_models[f"paddle {q}"] = result.pop("model")
            times[f"paddle {q}"].append(result)

    rows, results = [], {}
    fp32_times = [t["forward"] for t in times["fp32"]]
    for name in names:
        runs = times[name]
        total = [t["forward"] + t["thresholds"] for t in runs]
        entry = {
            "forward_s": median([t["forward"] for t in runs]),
            "thresholds_s": median([t["thresholds"] for t in runs]),
            "quantize_s": median([t["quantize"] for t in runs]),
            "calibration_s": median(total),
            "forward_ratio": median([t["forward"] / f for t, f in zip(runs, fp32_times)]),
            "calibration_ratio": median([c / f for c, f in zip(total, fp32_times)]),
        }
        if name.startswith("qtrainer"):
            entry["simulated_top1"] = accuracy(last_models[name], test.images, test.labels)
        results[name] = entry
        rows.append([name, entry["forward_s"] * 1e3, entry["thresholds_s"] * 1e3, entry["calibration_s"] * 1e3,
                     entry["forward_ratio"], entry["calibration_ratio"], entry.get("simulated_top1", "")])
    float_top1 = accuracy(net, test.images, test.labels)

    ours = {n: float(l.act_scale().numpy()[0]) for n, l in calibration_layers(last_models["qtrainer KLQuantizer"])}
    theirs = paddle_input_thresholds(last_models["paddle KLQuantizer"])
    kl_rows = [[n, ours[n], theirs.get(n, float("nan"))] for n in ours]

    print(f"\nCalibration of {args.batches} batches of {args.batch_size} (small CNN, Fashion-MNIST, "
          f"{args.rounds} interleaved rounds, median; fp32 top-1 {float_top1:.4f})")
    print_table(["variant", "forward ms", "thresholds ms", "total ms", "forward / fp32", "total / fp32",
                 "simulated top-1"], rows)
    print("\nKL thresholds of the quantized layers' inputs")
    print_table(["layer", "qtrainer", "paddle ImperativePTQ"], kl_rows)
    goal = results["qtrainer KLQuantizer"]["calibration_ratio"]
    print(f"\nqtrainer KL calibration / fp32 forward: {goal:.2f}x (goal <= 1.5x: {'met' if goal <= 1.5 else 'NOT met'})")

    path = write_json("ptq_calibration" + ("_quick" if args.quick else ""), {
        "config": {"batches": args.batches, "batch_size": args.batch_size, "rounds": args.rounds,
                   "train_images": args.train_images, "threads": args.threads},
        "fp32_top1": float_top1,
        "results": results,
        "kl_input_thresholds": {n: {"qtrainer": a, "paddle": b} for n, a, b in kl_rows},
        "goal_kl_calibration_ratio": {"value": goal, "goal": 1.5, "met": goal <= 1.5},
    })
    print(f"written {path}")


if __name__ == "__main__":
    main()
