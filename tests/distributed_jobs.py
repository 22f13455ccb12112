"""The data-parallel job the multi-process tests run, and the script their child processes execute.

``tests/test_spawn.py`` and ``tests/test_strategies.py`` start every multi-process run as a child
``python tests/distributed_jobs.py <scenario> <out>`` with a timeout (see ``run_child``), so a hang
fails a test instead of stalling the suite; the children dump what they saw (``DumpState``) for the
tests to compare with a one-process reference run with the global batch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
from paddle import nn

from qtrainer import Callback, Module, Trainer
from qtrainer.callbacks import ModelCheckpoint
from qtrainer.loggers import CSVLogger
from qtrainer.strategies import DDPStrategy

from helpers import child_env, run_script  # noqa: F401 - child_env is part of this module's test API

HERE = Path(__file__).resolve()
BATCH = 4            # per rank; the one-process reference uses 2 * BATCH
N_TRAIN, N_VAL = 48, 30
TIMEOUT = 120        # seconds for one multi-process child run (each takes ~5-20 s here)


# ------------------------------------------------------------------------------------ the job
class Points(paddle.io.Dataset):
    """Fixed 2-class points (no randomness when read, so every process sees the same values)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.RandomState(seed)
        self.x = rng.normal(size=(n, 8)).astype("float32")
        self.y = (self.x[:, :2].sum(axis=1) > 0).astype("int64")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Net(Module):
    """An MLP without dropout: the same result on 2 ranks as on one with the global batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).astype("float32").mean())

    def configure_optimizers(self):
        return paddle.optimizer.Momentum(0.05, momentum=0.9, parameters=self.parameters())


class NotPicklable(Net):
    def __init__(self) -> None:
        super().__init__()
        self.transform = lambda x: x


def new_net(cls=Net) -> Net:
    paddle.seed(0)
    return cls()


def train_loader(batch_size: int = BATCH, n: int = N_TRAIN, drop_last: bool = False) -> paddle.io.DataLoader:
    """A plain shuffled loader: under 2 ranks the Trainer shards it (DistributedBatchSampler)."""
    return paddle.io.DataLoader(Points(n), batch_size=batch_size, shuffle=True, drop_last=drop_last)


def global_train_loader() -> paddle.io.DataLoader:
    """The one-process loader whose batches are the union of the 2 ranks' batches."""
    sampler = paddle.io.DistributedBatchSampler(Points(N_TRAIN), 2 * BATCH, num_replicas=1, rank=0, shuffle=True)
    return paddle.io.DataLoader(Points(N_TRAIN), batch_sampler=sampler)


def val_loader() -> paddle.io.DataLoader:
    return paddle.io.DataLoader(Points(N_VAL, seed=1), batch_size=7)


def weights(module: nn.Layer) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in module.state_dict().items()}


def quiet(root, **overrides) -> dict:
    kwargs = dict(default_root_dir=str(root), enable_progress_bar=False, logger=False, enable_checkpointing=False,
                  seed=0, max_epochs=2)
    kwargs.update(overrides)
    return kwargs


def reference_fit(root, **overrides) -> tuple[Net, Trainer]:
    """One process, global batch: what a 2-rank run must reproduce."""
    module = new_net()
    trainer = Trainer(**quiet(root, **overrides))
    trainer.fit(module, global_train_loader(), val_loader())
    return module, trainer


# ---------------------------------------------------------------- callbacks used in the children
class WriteAudit(Callback):
    """Records, per rank, every file this process creates, writes, renames or removes under ``root``."""

    def __init__(self, root: str, out_dir: str) -> None:
        self.root, self.out_dir = os.path.realpath(root), out_dir
        self.records: list[list[str]] = []
        self.active = False

    def setup(self, trainer, module, stage):
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

        def hook(event, args):
            if not self.active:
                return
            if event == "open":
                path, mode, flags = args
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                    (isinstance(flags, int) and flags & write_flags)
            elif event == "os.rename":  # (source, destination): the destination is what gets written
                path, writing = args[1], True
            elif event in ("os.remove", "os.mkdir", "os.rmdir", "os.truncate"):
                path, writing = args[0], True
            else:
                return
            if writing and isinstance(path, (str, bytes, os.PathLike)):
                path = os.path.realpath(os.fsdecode(path))
                if path.startswith(self.root):
                    self.records.append([event, os.path.relpath(path, self.root)])

        self.active = True
        sys.addaudithook(hook)

    def teardown(self, trainer, module, stage):
        self.active = False
        with open(os.path.join(self.out_dir, f"audit.rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(self.records, handle)


class DumpState(Callback):
    """Saves this rank's final state dict (and run facts) to ``out_dir/<tag>.rank<r>.npz``."""

    def __init__(self, out_dir: str, tag: str) -> None:
        self.out_dir, self.tag = out_dir, tag

    def on_fit_end(self, trainer, module):
        facts = {"world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                 "epoch": trainer.current_epoch, "step": trainer.global_step,
                 "metrics": trainer.callback_metrics, "history": trainer.log_history,
                 "sigterm_caught": sigterm_caught()}
        np.savez(os.path.join(self.out_dir, f"{self.tag}.rank{trainer.global_rank}.npz"),
                 __facts__=json.dumps(facts), **weights(module))


class DumpThresholds(Callback):
    """Saves this rank's activation thresholds (``out_dir/<tag>.rank<r>.json``) at the end of the fit."""

    def __init__(self, out_dir: str, tag: str) -> None:
        self.out_dir, self.tag = out_dir, tag

    def on_fit_end(self, trainer, module):
        with open(os.path.join(self.out_dir, f"{self.tag}.rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(thresholds(module), handle)


def sigterm_caught() -> bool:
    """Whether this process has a SIGTERM handler installed (by anyone, C++ included), from the kernel."""
    with open("/proc/self/status") as handle:
        caught = next(int(line.split()[1], 16) for line in handle if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def thresholds(module: nn.Layer) -> dict[str, list[float]]:
    from qtrainer.quant.transforms.wrap import iter_quanted_layers

    return {name: layer.act_scale().numpy().tolist() for name, layer in iter_quanted_layers(module)}


def ptq_callback():
    from qtrainer.callbacks import PTQCallback

    return PTQCallback(export_dir=False, report=False, log_stats=False, check_batches=0)


class DieOnRank1(Callback):
    """Rank 1 kills itself (SIGKILL: no Python clean-up) after ``step`` optimizer steps, noting when."""

    def __init__(self, step: int, out_dir: str) -> None:
        self.step, self.out_dir = step, out_dir

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            Path(self.out_dir, "died_at").write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseOnRank1(Callback):
    """Rank 1 raises after ``step`` optimizer steps, while rank 0 goes on to its next collective."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            raise RuntimeError(f"rank 1 fails on purpose at step {self.step}")


class NoteFailure(Callback):
    """Notes when this rank's run failed (``out_dir/failed_at.rank<r>``)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_exception(self, trainer, module, exception):
        Path(self.out_dir, f"failed_at.rank{trainer.global_rank}").write_text(repr(time.time()))


class StopOnRank1(Callback):
    """Only rank 1 asks to stop, after the first epoch."""

    def on_train_epoch_end(self, trainer, module):
        if trainer.global_rank == 1:
            trainer.should_stop = True


def load_dump(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "__facts__"}
        return json.loads(str(data["__facts__"])), arrays


# ------------------------------------------------------------------------ child-process runs
def run_child(*args: str, timeout: float = TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run this file as a script (``scenario``, ``out``) in a new session; kill the whole session on timeout."""
    return run_script(str(HERE), *args, timeout=timeout, env=env)


def check_child(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _spawn_fit(out: str) -> None:
    """``Trainer(strategy="ddp", devices=2).fit``: our own spawn path, loaders passed to fit."""
    root = os.path.join(out, "root")
    os.makedirs(root, exist_ok=True)
    module = new_net()
    trainer = Trainer(**quiet(root, strategy="ddp", devices=2, enable_checkpointing=True, logger=CSVLogger(root),
                              callbacks=[ModelCheckpoint(save_last=True), WriteAudit(root, out), DumpState(out, "fit")]))
    trainer.fit(module, train_loader(), val_loader())
    # what the calling process got back from rank 0
    np.savez(os.path.join(out, "parent.npz"), __facts__=json.dumps({
        "step": trainer.global_step, "epoch": trainer.current_epoch, "metrics": trainer.callback_metrics,
        "best_model_path": trainer.checkpoint_callback.best_model_path, "log_dir": trainer.log_dir}),
        **weights(module))


def _spawn_too_many_processes(out: str) -> None:
    """12 samples, batch 8, drop_last: one batch for one process, none for each of 2 (both raise)."""
    trainer = Trainer(**quiet(out, strategy="ddp", devices=2, callbacks=[NoteFailure(out)]))
    try:
        trainer.fit(new_net(), train_loader(batch_size=8, n=12, drop_last=True))
    except ValueError as exc:
        Path(out, "raised_at").write_text(repr(time.time()))
        print(f"RAISED ValueError: {exc}")


def _spawn_rank_raises(out: str) -> None:
    """Rank 1 raises at step 3; rank 0 is then in (or on its way to) the next gradient all-reduce."""
    trainer = Trainer(**quiet(out, strategy="ddp", devices=2, max_epochs=1000,
                              callbacks=[RaiseOnRank1(3), NoteFailure(out)]))
    try:
        trainer.fit(new_net(), train_loader())
    except Exception as exc:  # noqa: BLE001 - the test reads what was raised
        Path(out, "raised_at").write_text(repr(time.time()))
        print(f"RAISED {type(exc).__name__}: {exc}\nCAUSE {exc.__cause__}")


def _spawn_dies(out: str) -> None:
    trainer = Trainer(**quiet(out, strategy="ddp", devices=2, max_epochs=1000, callbacks=[DieOnRank1(3, out)]))
    try:
        trainer.fit(new_net(), train_loader())
    except Exception as exc:  # noqa: BLE001 - the test reads what was raised
        Path(out, "raised_at").write_text(repr(time.time()))
        print(f"RAISED {type(exc).__name__}: {str(exc)[:300]}")


def _launched_fit(out: str) -> None:
    """Run by each process of ``python -m paddle.distributed.launch``: a plain ``Trainer()``."""
    trainer = Trainer(**quiet(out, callbacks=[DumpState(out, "launch")]))
    trainer.fit(new_net(), train_loader(), val_loader())


def _no_watchdog(out: str) -> None:
    """A rank of a job nobody supervises (as on several nodes); rank 1 dies at step 3."""
    os.makedirs(out, exist_ok=True)
    trainer = Trainer(**quiet(out, max_epochs=1000, callbacks=[DieOnRank1(3, out)]))
    trainer.fit(new_net(), train_loader())


def _group(out: str) -> None:
    """Several short runs in one 2-process group (started by paddle.distributed.spawn)."""
    import paddle.distributed as dist

    dist.spawn(_group_worker, args=(out,), nprocs=2, backend="gloo")


def _group_worker(out: str) -> None:
    import paddle.distributed as dist

    from qtrainer.quant import QATCallback
    from qtrainer.quant import AbsmaxCalibrator, HistCalibrator, KLCalibrator, MSECalibrator
    from qtrainer.quant.diagnostics.sync import reduce_calibration_stats

    def fit(tag, module=None, ckpt_path=None, callbacks=(), **overrides):
        trainer = Trainer(**quiet(os.path.join(out, "root"), **overrides))
        trainer.fit(module or new_net(), train_loader(), val_loader(), ckpt_path=ckpt_path,
                    callbacks=[*callbacks, DumpState(out, tag)])
        return trainer

    # quantization-aware training with and without synchronised scales
    fit("qat_sync", callbacks=[QATCallback(export_dir=False, log_stats=False)])
    fit("qat_nosync", callbacks=[QATCallback(export_dir=False, log_stats=False, sync=None)])
    fit("qat_pact", callbacks=[QATCallback({"activation_preprocess_type": "PACT", "pact_warmup_steps": 4},
                                           export_dir=False, log_stats=False)], max_epochs=1)
    fit("qat_logged", callbacks=[QATCallback(export_dir=False)], max_epochs=1, log_every_n_steps=2,
        logger=CSVLogger(os.path.join(out, "root"), name="qat_csv"))
    # gradient accumulation (micro-batches under no_sync)
    fit("accumulate", accumulate_grad_batches=2)
    # a stop requested by one rank stops every rank
    fit("stop", max_epochs=5, callbacks=[StopOnRank1()])
    # exact resume from a mid-epoch checkpoint
    fit("resume_full", max_epochs=2)
    ckpt_dir = os.path.join(out, "ckpt")
    fit("resume_part", max_steps=5, callbacks=[ModelCheckpoint(ckpt_dir, every_n_train_steps=5)])
    fit("resume_rest", module=new_net(), ckpt_path=os.path.join(ckpt_dir, "epoch=0-step=5.ckpt"), max_epochs=2)
    # post-training quantization: each rank calibrates on its shard of the training data
    fit("ptq_callback", callbacks=[ptq_callback(), DumpThresholds(out, "ptq_callback")])
    # the calibrators on their own, on this rank's half of the data
    rank, world = dist.get_rank(), dist.get_world_size()
    calibrators = {"absmax": AbsmaxCalibrator(), "hist": HistCalibrator(bins=128, upsample_bins=8),
                   "kl": KLCalibrator(bins=256, upsample_bins=8), "mse": MSECalibrator(bins=128, upsample_bins=8)}
    for batch in calibration_batches()[rank::world]:
        for calibrator in calibrators.values():
            calibrator(paddle.to_tensor(batch))
    reduce_calibration_stats(calibrators, DDPStrategy().all_reduce)
    with open(os.path.join(out, f"ptq.rank{rank}.json"), "w") as handle:
        json.dump({name: float(c.scale().numpy()[0]) for name, c in calibrators.items()}, handle)


def calibration_batches() -> list[np.ndarray]:
    rng = np.random.RandomState(3)
    return [(rng.standard_t(3, size=(16, 24)) * scale).astype("float32") for scale in (0.5, 1.0, 2.0, 8.0, 0.2, 3.0)]


_CHILD_SCENARIOS = {"spawn-fit": _spawn_fit, "too-many": _spawn_too_many_processes, "spawn-dies": _spawn_dies,
                    "spawn-raises": _spawn_rank_raises,
                    "launched-fit": _launched_fit, "no-watchdog": _no_watchdog, "group": _group}


def _main(argv: list[str]) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    _CHILD_SCENARIOS[argv[0]](*argv[1:])


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0, err_msg=key)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    _main(sys.argv[1:])
