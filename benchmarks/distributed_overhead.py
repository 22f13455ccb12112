"""Data-parallel overhead on this machine: 1 vs 2 processes, and the cost of synchronising QAT scales.

    python benchmarks/distributed_overhead.py [--steps 30] [--repeats 5] [--batch 64]

The small CNN of ``examples/train_fashion_mnist.py`` on synthetic 28x28 images, one epoch of
``--steps`` batches per run, the median wall time between consecutive training batches (data
loading, forward, backward, gradient all-reduce, optimizer step and callbacks) over the run:

* ``1 process, 2 threads, batch 2B``  -- the global batch in one process (all cores);
* ``1 process, 1 thread, batch B``    -- what each rank computes, without communication;
* ``2 processes (gloo), B per rank``  -- ``Trainer(strategy="ddp")``: the same global batch;
* ``2 processes, QAT, unsynchronised`` vs ``2 processes, QAT, synchronised scales`` -- QATCallback
  with ``sync=None`` and ``sync="auto"``, interleaved run by run in the same process group;
  plus the time of one ``QuantStateSync`` call on its own.

Writes ``benchmarks/results/distributed_overhead.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import paddle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from train_fashion_mnist import small_cnn  # noqa: E402

from _common import median, print_table, write_json  # noqa: E402
from qtrainer import Callback, ClassificationModule, Trainer  # noqa: E402


class Images(paddle.io.Dataset):
    """Synthetic 1x28x28 images with 10 classes (no decoding cost)."""

    def __init__(self, n: int) -> None:
        rng = np.random.RandomState(0)
        self.x = rng.normal(size=(n, 1, 28, 28)).astype("float32")
        self.y = rng.randint(0, 10, size=(n,)).astype("int64")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class StepTimer(Callback):
    """Wall time between consecutive training batch ends (the first ``skip`` are warm-up)."""

    def __init__(self, skip: int = 3) -> None:
        self.skip, self.times, self._last = skip, [], None

    def on_train_epoch_start(self, trainer, module):
        self._last, self.times = None, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None and batch_idx > self.skip:
            self.times.append(now - self._last)
        self._last = now


def run(steps: int, batch: int, threads: int, callbacks=(), strategy="auto") -> tuple[float, Trainer]:
    """Median seconds per step of one epoch of ``steps`` batches of ``batch`` per process."""
    paddle.seed(0)
    module = ClassificationModule(small_cnn(), lr=1e-3)
    timer = StepTimer()
    world = paddle.distributed.get_world_size()
    loader = paddle.io.DataLoader(Images(steps * batch * world), batch_size=batch, shuffle=True, drop_last=True)
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(max_epochs=1, default_root_dir=root, num_sanity_val_steps=0, logger=False,
                          enable_progress_bar=False, enable_checkpointing=False, num_threads=threads, seed=0,
                          strategy=strategy)
        with contextlib.redirect_stderr(io.StringIO()):
            trainer.fit(module, loader, callbacks=[*callbacks, timer])
    return median(timer.times), trainer


def two_process_worker(steps: int, batch: int, repeats: int, out: str) -> None:
    from qtrainer.quant import QATCallback
    from qtrainer.quant.diagnostics.sync import QuantStateSync

    results: dict[str, list[float]] = {"ddp_fp32": [], "qat_nosync": [], "qat_sync": []}
    sync_call = []
    for _ in range(repeats):  # interleaved, so that load changes hit every configuration alike
        results["ddp_fp32"].append(run(steps, batch, 1)[0])
        results["qat_nosync"].append(run(steps, batch, 1, [QATCallback(export_dir=False, log_stats=False,
                                                                       sync=None)])[0])
        qat = QATCallback(export_dir=False, log_stats=False)
        seconds, trainer = run(steps, batch, 1, [qat])
        results["qat_sync"].append(seconds)
        sync = QuantStateSync(trainer.module, trainer.strategy.all_gather)
        for _ in range(10):
            sync()
        start = time.perf_counter()
        for _ in range(100):
            sync()
        sync_call.append((time.perf_counter() - start) / 100)
        values = len(sync.local_values())
    if paddle.distributed.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump({"runs": results, "sync_call": sync_call, "sync_values": values}, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="batch per process")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    single: dict[str, list[float]] = {"one_2threads_2B": [], "one_1thread_B": []}
    for _ in range(args.repeats):
        single["one_2threads_2B"].append(run(args.steps, 2 * args.batch, 2)[0])
        single["one_1thread_B"].append(run(args.steps, args.batch, 1)[0])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "two.json")
        paddle.distributed.spawn(two_process_worker, args=(args.steps, args.batch, args.repeats, out), nprocs=2,
                                 backend="gloo")
        with open(out) as handle:
            two = json.load(handle)

    runs = {**single, **two["runs"]}
    med = {name: median(times) for name, times in runs.items()}
    best = {name: min(times) for name, times in runs.items()}  # least disturbed by other load
    global_batch = 2 * args.batch
    labels = {"one_2threads_2B": ("1 process, 2 threads", global_batch),
              "one_1thread_B": ("1 process, 1 thread (one rank's work)", args.batch),
              "ddp_fp32": ("2 processes (gloo), fp32", global_batch),
              "qat_nosync": ("2 processes, QAT, unsynchronised scales", global_batch),
              "qat_sync": ("2 processes, QAT, synchronised scales", global_batch)}
    rows = [[label, batch, med[name] * 1e3, best[name] * 1e3, batch / med[name]]
            for name, (label, batch) in labels.items()]
    print_table(["run", "global batch", "ms/step (median)", "ms/step (best run)", "images/s"], rows)
    sync_ms = median(two["sync_call"]) * 1e3
    paired = [s / n for s, n in zip(two["runs"]["qat_sync"], two["runs"]["qat_nosync"])]
    summary = {
        "two_vs_one_process_step_time": med["ddp_fp32"] / med["one_2threads_2B"],
        "communication_ms_per_step": (med["ddp_fp32"] - med["one_1thread_B"]) * 1e3,
        "communication_ms_per_step_best_runs": (best["ddp_fp32"] - best["one_1thread_B"]) * 1e3,
        "qat_sync_extra": median(paired) - 1.0,
        "qat_sync_extra_best_runs": best["qat_sync"] / best["qat_nosync"] - 1.0,
        "sync_call_ms": sync_ms,
        "sync_call_share_of_qat_step": sync_ms / (med["qat_nosync"] * 1e3),
        "synced_values": two["sync_values"],
    }
    print(f"\n2 processes vs 1 (same global batch): {summary['two_vs_one_process_step_time']:.2f}x the step time; "
          f"communication and coordination ≈ {summary['communication_ms_per_step']:.1f} ms/step")
    print(f"QAT scale sync: {summary['qat_sync_extra'] * 100:+.1f}% step time (median of paired runs; best runs "
          f"{summary['qat_sync_extra_best_runs'] * 100:+.1f}%; goal <= 5%); one sync call "
          f"{sync_ms:.3f} ms for {two['sync_values']} values = {summary['sync_call_share_of_qat_step'] * 100:.1f}% "
          "of a QAT step")
    path = write_json("distributed_overhead", {
        "settings": vars(args), "median_s_per_step": med, "best_s_per_step": best, "runs_s_per_step": runs,
        "sync_call_s": two["sync_call"], "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
