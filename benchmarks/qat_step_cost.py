"""QAT training-step cost vs FP32 for the recipes' architectures (10 classes, Momentum).

    python benchmarks/qat_step_cost.py [--rounds 30] [--threads 1] [--paddle]      # MobileNetV1 x0.25, 64px, batch 32
    python benchmarks/qat_step_cost.py --arch resnet18 --image-size 32 --batch-size 64 --rounds 10

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
from paddle.vision import models

from _common import print_table, write_json
from qtrainer.quant import QAT

ARCHS = {
    "mobilenet_v1": lambda: models.mobilenet_v1(scale=0.25, num_classes=10),
    "mobilenet_v2": lambda: models.mobilenet_v2(scale=0.25, num_classes=10),
    "resnet18": lambda: models.resnet18(num_classes=10),
    "resnet50": lambda: models.resnet50(num_classes=10),
}


def make(arch: str, config):
    paddle.seed(1)
    net = ARCHS[arch]()
    if config is not None:
        QAT(config).quantize(net)
    net.train()
    return net, paddle.optimizer.Momentum(0.01, parameters=net.parameters())


def make_paddle_qat(arch: str):
    from paddle.quantization import ImperativeQuantAware

    paddle.seed(1)
    net = ARCHS[arch]()
    ImperativeQuantAware(weight_quantize_type="channel_wise_abs_max",
                         activation_quantize_type="moving_average_abs_max").quantize(net)
    net.train()
    return net, paddle.optimizer.Momentum(0.01, parameters=net.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paddle", action="store_true")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="mobilenet_v1", help="MobileNets at width 0.25")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    paddle.base.core.set_num_threads(args.threads)
    x = paddle.randn([args.batch_size, 3, args.image_size, args.image_size])
    y = paddle.randint(0, 10, [args.batch_size, 1])
    variants = {"fp32": make(args.arch, None), "qat": make(args.arch, {}),
                "qat_pact": make(args.arch, {"activation_preprocess_type": "PACT", "pact_warmup_steps": 1})}
    if args.paddle:
        variants["paddle_imperative_qat"] = make_paddle_qat(args.arch)

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
    print(f"{args.arch}, {args.image_size}px, batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.rounds} rotated rounds (CPU time of the process)")
    print_table(["variant", "ms/step", "x fp32"], rows)
    default_setting = (args.arch, args.image_size, args.batch_size) == ("mobilenet_v1", 64, 32)
    path = write_json("qat_step_cost" if default_setting else f"qat_step_cost_{args.arch}_{args.image_size}px", {
        "command": "python benchmarks/qat_step_cost.py " + " ".join(sys.argv[1:]),
        "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
        "rounds": args.rounds, "threads": args.threads,
        "ms_per_step": {r[0]: r[1] for r in rows}, "ratio_vs_fp32": {r[0]: r[2] for r in rows},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
