"""QAT training-step cost vs FP32: MobileNetV1 x0.25 (10 classes), 64px, batch 32, Momentum.

    python benchmarks/qat_step_cost.py [--rounds 30] [--threads 1] [--paddle]

Each round runs one step of every variant (order rotated); the ratio to FP32 is taken within the
round and the median over rounds is reported, so the load of a shared machine cancels out. CPU
time of the process is measured. ``--paddle`` adds Paddle's own ``ImperativeQuantAware`` (the
engine behind PaddleSlim's QAT) in the same harness.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import paddle
from paddle.vision.models import mobilenet_v1

from _common import print_table, write_json
from qtrainer.quant import QAT


def make(config):
    paddle.seed(1)
    net = mobilenet_v1(scale=0.25, num_classes=10)
    if config is not None:
        QAT(config).quantize(net)
    net.train()
    return net, paddle.optimizer.Momentum(0.01, parameters=net.parameters())


def make_paddle_qat():
    from paddle.quantization import ImperativeQuantAware

    paddle.seed(1)
    net = mobilenet_v1(scale=0.25, num_classes=10)
    ImperativeQuantAware(weight_quantize_type="channel_wise_abs_max",
                         activation_quantize_type="moving_average_abs_max").quantize(net)
    net.train()
    return net, paddle.optimizer.Momentum(0.01, parameters=net.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paddle", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    paddle.base.core.set_num_threads(args.threads)
    x, y = paddle.randn([32, 3, 64, 64]), paddle.randint(0, 10, [32, 1])
    variants = {"fp32": make(None), "qat": make({}),
                "qat_pact": make({"activation_preprocess_type": "PACT", "pact_warmup_steps": 1})}
    if args.paddle:
        variants["paddle_imperative_qat"] = make_paddle_qat()

    def step(net, optimizer):
        loss = paddle.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()

    for pair in variants.values():
        for _ in range(3):
            step(*pair)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.process_time()
            step(*variants[name])
            times[name].append(time.process_time() - start)
    t = {k: np.array(v) for k, v in times.items()}
    rows = [[name, float(np.median(t[name]) * 1e3), float(np.median(t[name] / t["fp32"]))] for name in names]
    print(f"MobileNetV1 x0.25, 64px, batch 32, {args.threads} thread(s), median of {args.rounds} rotated rounds")
    print_table(["variant", "ms/step", "x fp32"], rows)
    path = write_json("qat_step_cost", {
        "command": "python benchmarks/qat_step_cost.py " + " ".join(sys.argv[1:]),
        "rounds": args.rounds, "threads": args.threads,
        "ms_per_step": {r[0]: r[1] for r in rows}, "ratio_vs_fp32": {r[0]: r[2] for r in rows},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
