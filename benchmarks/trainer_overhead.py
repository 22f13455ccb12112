"""Trainer overhead: the same small CNN, data and steps through three loops, interleaved.

    python benchmarks/trainer_overhead.py [--steps 60] [--repeats 5] [--threads 2]

(a) ``Trainer.fit`` with its default callbacks (progress bar, checkpoint) and TensorBoard logger,
on a Module doing the hand loop's work (cross-entropy + Adam) and logging its loss,
(b) a hand-written Paddle loop, (c) ``paddle.Model.fit``. Each run times the whole call (setup,
one epoch of ``--steps`` batches of 64 real Fashion-MNIST images, checkpoint/log writing) and
reports the median time per step and the ratios to the hand-written loop. Each round runs the
three in another order (rounds go through all six orders, so no loop always follows the same
one; use ``--repeats 6`` or more), garbage is collected before each run, and besides the ratio
of the medians the median of the per-round ratios is reported: on a shared machine it is the
steadier figure.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import io
import os
import sys
import tempfile
import time

import paddle
import paddle.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from train_fashion_mnist import small_cnn  # noqa: E402

from _common import median, print_table, write_json  # noqa: E402
from qtrainer import Module, Trainer  # noqa: E402
from qtrainer.data import FashionMNISTDataset  # noqa: E402

BATCH = 64


def make_loader(steps: int) -> paddle.io.DataLoader:
    return paddle.io.DataLoader(FashionMNISTDataset("train", limit=steps * BATCH), batch_size=BATCH, shuffle=False)


class LossOnly(Module):
    """The hand loop's work (cross-entropy, Adam) as a Module that logs its loss like any user's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self.net(images), labels.reshape([-1]))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return paddle.optimizer.Adam(1e-3, parameters=self.parameters())


def run_trainer(loader, root: str) -> float:
    paddle.seed(0)
    module = LossOnly()
    trainer = Trainer(max_epochs=1, default_root_dir=root, num_sanity_val_steps=0)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(module, loader)
    return time.perf_counter() - start


def run_hand_loop(loader, root: str) -> float:
    paddle.seed(0)
    net = small_cnn()
    optimizer = paddle.optimizer.Adam(1e-3, parameters=net.parameters())
    start = time.perf_counter()
    net.train()
    for images, labels in loader:
        loss = F.cross_entropy(net(images), labels.reshape([-1]))
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    return time.perf_counter() - start


def run_paddle_model(loader, root: str) -> float:
    paddle.seed(0)
    net = small_cnn()
    model = paddle.Model(net)
    model.prepare(paddle.optimizer.Adam(1e-3, parameters=net.parameters()), paddle.nn.CrossEntropyLoss())
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        model.fit(loader, epochs=1, verbose=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    paddle.base.core.set_num_threads(args.threads)
    loader = make_loader(args.steps)
    runs = {"qtrainer Trainer.fit": run_trainer, "hand-written loop": run_hand_loop, "paddle.Model.fit": run_paddle_model}
    times: dict[str, list[float]] = {name: [] for name in runs}
    orders = list(itertools.permutations(runs))
    with tempfile.TemporaryDirectory() as root:
        for name, fn in runs.items():  # warm-up, not timed
            fn(loader, root)
        for round_index in range(args.repeats):
            for name in orders[round_index % len(orders)]:
                gc.collect()
                times[name].append(runs[name](loader, root) / args.steps)
    hand = median(times["hand-written loop"])
    round_ratios = {name: median([a / b for a, b in zip(t, times["hand-written loop"])]) for name, t in times.items()}
    rows = [[name, median(t) * 1000, median(t) / hand, round_ratios[name]] for name, t in times.items()]
    print(f"{args.steps} steps of batch {BATCH}, {args.threads} threads, median of {args.repeats} interleaved runs")
    print_table(["loop", "ms/step", "x hand loop", "median of round ratios"], rows)
    trainer_vs_model = median(times["qtrainer Trainer.fit"]) / median(times["paddle.Model.fit"])
    rounds_vs_model = median([a / b for a, b in zip(times["qtrainer Trainer.fit"], times["paddle.Model.fit"])])
    print(f"Trainer / paddle.Model.fit = {trainer_vs_model:.3f} (median of round ratios {rounds_vs_model:.3f})")
    path = write_json("trainer_overhead", {
        "command": "python benchmarks/trainer_overhead.py " + " ".join(sys.argv[1:]),
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "ms_per_step": {name: median(t) * 1000 for name, t in times.items()},
        "all_runs_ms_per_step": {name: [x * 1000 for x in t] for name, t in times.items()},
        "ratio_vs_hand_loop": {name: median(t) / hand for name, t in times.items()},
        "median_round_ratio_vs_hand_loop": round_ratios,
        "trainer_vs_paddle_model": trainer_vs_model,
        "median_round_ratio_trainer_vs_paddle_model": rounds_vs_model,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
