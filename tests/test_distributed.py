"""Data-parallel training on 2 CPU processes (gloo): qtrainer/strategy.py and qtrainer/distributed.py.

Every multi-process run happens in a child ``python`` started by the test with a timeout (this file
doubles as the script those children run, see ``_main``), so a hang fails the test instead of
stalling the suite. Reference results come from one process with the global batch.
"""
from __future__ import annotations

import json
import os
import signal
import socket
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
from qtrainer.distributed import agree_on_batches, resolve_strategy, shard_dataloader
from qtrainer.loggers import CSVLogger
from qtrainer.strategy import DDPStrategy, SingleProcess

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
            elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate"):
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
    from qtrainer.quant.wrap import iter_quanted_layers

    return {name: layer.act_scale().numpy().tolist() for name, layer in iter_quanted_layers(module)}


def ptq_callback():
    from qtrainer.quant.ptq_callback import PTQCallback

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
def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child ``python``: one thread, and this checkout's qtrainer importable."""
    root = str(HERE.parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_child(*args: str, timeout: float = TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run this file as a script in a new session; kill the whole session on timeout."""
    proc = subprocess.Popen([sys.executable, str(HERE), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=child_env(**(env or {})),
                            cwd=str(HERE.parent.parent))
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"`{' '.join(args)}` did not finish in {timeout} s (hang?):\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


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
    from qtrainer.quant.calibrators import AbsmaxCalibrator, HistCalibrator, KLCalibrator, MSECalibrator
    from qtrainer.quant.sync import reduce_calibration_stats

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


# ------------------------------------------------------------------------ fixtures: the runs
@pytest.fixture(scope="module")
def spawn_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp("spawn_fit")
    check_child(run_child("spawn-fit", str(out)))
    return out


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    out = tmp_path_factory.mktemp("group")
    check_child(run_child("group", str(out)))
    return out


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0, err_msg=key)


# ---------------------------------------------------------------------- 2 ranks == 1 rank
def test_two_rank_fit_equals_one_rank_with_the_global_batch(spawn_fit, tmp_path):
    reference, ref_trainer = reference_fit(tmp_path)
    facts0, rank0 = load_dump(spawn_fit / "fit.rank0.npz")
    facts1, rank1 = load_dump(spawn_fit / "fit.rank1.npz")
    assert facts0["world_size"] == facts1["world_size"] == 2 and facts0["strategy"] == "DDPStrategy"
    assert facts0["step"] == ref_trainer.global_step == N_TRAIN // (2 * BATCH) * 2
    assert_close(rank0, rank1, atol=0)                    # DataParallel keeps ranks identical
    assert_close(rank0, weights(reference), atol=2e-6)    # and equal to the global-batch run
    for name in ("val_loss", "val_acc"):
        assert facts0["metrics"][name] == pytest.approx(ref_trainer.callback_metrics[name], abs=1e-6)
        assert facts1["metrics"][name] == facts0["metrics"][name]


def test_the_calling_process_gets_rank_zeros_results(spawn_fit):
    parent, parent_weights = load_dump(spawn_fit / "parent.npz")
    facts0, rank0 = load_dump(spawn_fit / "fit.rank0.npz")
    assert_close(parent_weights, rank0, atol=0)
    assert parent["step"] == facts0["step"] and parent["metrics"] == facts0["metrics"]
    assert os.path.isfile(parent["best_model_path"])
    assert os.path.dirname(os.path.dirname(parent["best_model_path"])) == parent["log_dir"]


def test_only_rank_zero_writes_files(spawn_fit):
    rank0 = json.loads((spawn_fit / "audit.rank0.json").read_text())
    rank1 = json.loads((spawn_fit / "audit.rank1.json").read_text())
    written0 = {path for event, path in rank0 if event in ("open", "os.rename")}
    assert any(p.endswith(".ckpt") for p in written0) and any(p.endswith("metrics.csv") for p in written0)
    assert any(event == "os.mkdir" for event, _ in rank0)  # the audit sees directories being made
    assert rank1 == []  # rank 1 creates, writes, renames and removes nothing, directories included
    # the checkpoints and logs are where the calling process says they are
    files = {str(p.relative_to(spawn_fit / "root")) for p in (spawn_fit / "root").rglob("*") if p.is_file()}
    assert {"csv_logs/version_0/metrics.csv", "csv_logs/version_0/checkpoints/last.ckpt"} <= files


# ----------------------------------------------------------------------- quantization state
def quant_state(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if "quanter" in k or "preprocess" in k}


def test_ranks_hold_identical_quant_scales_after_qat_steps(group):
    _, rank0 = load_dump(group / "qat_sync.rank0.npz")
    _, rank1 = load_dump(group / "qat_sync.rank1.npz")
    state0, state1 = quant_state(rank0), quant_state(rank1)
    assert any(k.endswith("act_quanter.observer.accum") for k in state0)
    assert_close(state0, state1, atol=0)
    assert_close(rank0, rank1, atol=0)


def test_without_the_sync_the_ranks_scales_differ(group):
    _, rank0 = load_dump(group / "qat_nosync.rank0.npz")
    _, rank1 = load_dump(group / "qat_nosync.rank1.npz")
    accum = [k for k in rank0 if k.endswith("act_quanter.observer.accum")]
    assert accum and max(float(np.abs(rank0[k] - rank1[k]).max()) for k in accum) > 1e-3


def test_pact_alpha_is_identical_on_every_rank_through_and_after_its_warm_up(group):
    facts, rank0 = load_dump(group / "qat_pact.rank0.npz")
    _, rank1 = load_dump(group / "qat_pact.rank1.npz")
    alphas = [k for k in rank0 if k.endswith("act_preprocess.alpha")]
    assert alphas and facts["step"] > 4  # trained past the 4-step warm-up
    assert_close(quant_state(rank0), quant_state(rank1), atol=0)


def test_the_pre_sync_spread_of_scales_is_logged(group):
    [csv] = (group / "root" / "qat_csv").rglob("metrics.csv")
    header = csv.read_text().splitlines()[0].split(",")
    spread = [c for c in header if c.startswith("quant/scale_spread/")]
    assert "quant/scale_spread/max" in spread and any(c.endswith("act_quanter.observer.scale") for c in spread)


def test_two_rank_ptq_callback_thresholds_equal_one_rank_thresholds(group, tmp_path):
    module = new_net()
    Trainer(**quiet(tmp_path)).fit(module, paddle.io.DataLoader(Points(N_TRAIN), batch_size=8), val_loader(),
                                  callbacks=[ptq_callback()])
    expected = thresholds(module)
    assert len(expected) == 2
    for rank in range(2):
        assert json.loads((group / f"ptq_callback.rank{rank}.json").read_text()) == expected


def test_two_rank_calibrator_thresholds_equal_one_rank_thresholds(group):
    from qtrainer.quant.calibrators import AbsmaxCalibrator, HistCalibrator, KLCalibrator, MSECalibrator

    whole = {"absmax": AbsmaxCalibrator(), "hist": HistCalibrator(bins=128, upsample_bins=8),
             "kl": KLCalibrator(bins=256, upsample_bins=8), "mse": MSECalibrator(bins=128, upsample_bins=8)}
    for batch in calibration_batches():
        for calibrator in whole.values():
            calibrator(paddle.to_tensor(batch))
    expected = {name: float(c.scale().numpy()[0]) for name, c in whole.items()}
    for rank in range(2):
        assert json.loads((group / f"ptq.rank{rank}.json").read_text()) == expected


# ---------------------------------------------------------------- accumulation, stop, resume
def test_gradient_accumulation_on_two_ranks_equals_one_rank(group, tmp_path):
    reference, _ = reference_fit(tmp_path, accumulate_grad_batches=2)
    _, rank0 = load_dump(group / "accumulate.rank0.npz")
    _, rank1 = load_dump(group / "accumulate.rank1.npz")
    assert_close(rank0, rank1, atol=0)
    assert_close(rank0, weights(reference), atol=2e-6)


class _RecordingStrategy(SingleProcess):
    def __init__(self) -> None:
        self.flags: list[bool] = []

    def training_step(self, model, batch, batch_idx, sync_gradients=True):
        self.flags.append(sync_gradients)
        return super().training_step(model, batch, batch_idx, sync_gradients)


def test_accumulation_micro_batches_skip_the_gradient_reduction(tmp_path):
    strategy = _RecordingStrategy()
    trainer = Trainer(**quiet(tmp_path, max_epochs=1, accumulate_grad_batches=3, strategy=strategy))
    trainer.fit(new_net(), paddle.io.DataLoader(Points(28), batch_size=4))  # 7 batches: 3 + 3 + 1
    assert strategy.flags == [False, False, True, False, False, True, True]


def test_a_stop_requested_by_one_rank_stops_all(group):
    for rank in range(2):
        facts, _ = load_dump(group / f"stop.rank{rank}.npz")
        assert facts["epoch"] == 1


def test_resume_on_two_ranks_continues_exactly(group):
    full, full_weights = load_dump(group / "resume_full.rank0.npz")
    part, _ = load_dump(group / "resume_part.rank0.npz")
    assert part["step"] == 5 and part["epoch"] == 0  # stopped mid-epoch (6 steps per epoch)
    for rank in range(2):
        rest, rest_weights = load_dump(group / f"resume_rest.rank{rank}.npz")
        assert_close(rest_weights, full_weights, atol=1e-6)
        assert rest["step"] == full["step"]
        val = lambda history: [(r["step"], r.get("val_loss"), r.get("train_loss_epoch")) for r in history]  # noqa: E731
        assert val(rest["history"]) == pytest.approx(val(full["history"]))


# --------------------------------------------------------------------- launch and failures
def test_runs_under_paddle_distributed_launch(tmp_path):
    log_dir = tmp_path / "launch_logs"
    proc = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
         str(HERE), "launched-fit", str(tmp_path)],
        capture_output=True, text=True, timeout=TIMEOUT, env=child_env(), cwd=str(HERE.parent.parent))
    logs = "".join(p.read_text() for p in sorted(log_dir.glob("workerlog.*")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:] + logs[-3000:]
    facts0, rank0 = load_dump(tmp_path / "launch.rank0.npz")
    facts1, rank1 = load_dump(tmp_path / "launch.rank1.npz")
    assert facts0["world_size"] == 2 and facts0["strategy"] == "DDPStrategy"
    reference, _ = reference_fit(tmp_path / "reference")
    assert_close(rank0, rank1, atol=0)
    assert_close(rank0, weights(reference), atol=2e-6)


def test_a_rank_that_dies_makes_the_spawned_run_fail_quickly(tmp_path):
    out = check_child(run_child("spawn-dies", str(tmp_path), timeout=90))
    assert "RAISED SpawnedProcessError" in out and "rank 1 of 2 terminated with signal SIGKILL" in out, out[-3000:]
    died = float((tmp_path / "died_at").read_text())
    assert float((tmp_path / "raised_at").read_text()) - died < 60


def test_a_rank_that_raises_makes_the_spawned_run_fail_quickly_with_its_error(tmp_path):
    out = check_child(run_child("spawn-raises", str(tmp_path), timeout=90))
    assert "RAISED RuntimeError: rank 1 fails on purpose at step 3" in out, out[-3000:]
    # the cause is rank 1's own traceback, not rank 0's echo of it (a lost connection)
    assert "CAUSE rank 1 of 2 failed" in out and "in on_train_batch_end" in out, out[-3000:]
    failed = float((tmp_path / "failed_at.rank1").read_text())
    assert float((tmp_path / "raised_at").read_text()) - failed < 60


def test_spawned_processes_end_at_once_on_sigterm(spawn_fit, group):
    # Paddle's crash handler catches SIGTERM and can deadlock in it (it allocates memory inside the
    # handler); the processes qtrainer spawns restore the default action, plain paddle.distributed.spawn
    # processes (the group run) keep the handler.
    for rank in range(2):
        assert load_dump(spawn_fit / f"fit.rank{rank}.npz")[0]["sigterm_caught"] is False
        assert load_dump(group / f"stop.rank{rank}.npz")[0]["sigterm_caught"] is True


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_without_a_watchdog_the_survivor_exits_with_an_error_instead_of_hanging(tmp_path):
    master, port0, port1 = _free_ports(3)
    endpoints = f"127.0.0.1:{port0},127.0.0.1:{port1}"
    procs = []
    for rank, port in enumerate((port0, port1)):
        env = child_env(PADDLE_TRAINER_ID=str(rank), PADDLE_TRAINERS_NUM="2", PADDLE_TRAINER_ENDPOINTS=endpoints,
                        PADDLE_CURRENT_ENDPOINT=f"127.0.0.1:{port}", PADDLE_MASTER=f"127.0.0.1:{master}")
        procs.append(subprocess.Popen([sys.executable, str(HERE), "no-watchdog", str(tmp_path / f"r{rank}")],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      start_new_session=True, cwd=str(HERE.parent.parent)))
    try:
        procs[1].wait(timeout=90)
        assert procs[1].returncode == -signal.SIGKILL
        died = float((tmp_path / "r1" / "died_at").read_text())
        procs[0].wait(timeout=60)
        assert time.time() - died < 60
        out = procs[0].stdout.read()
        assert procs[0].returncode != 0, out[-2000:]
        assert "Connection reset by peer" in out or "gloo" in out, out[-2000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# -------------------------------------------------------------------------------- bad input
class _TwoRanks:
    """A strategy stub whose all_gather returns what two ranks would report."""

    world_size, is_global_zero = 2, True

    def __init__(self, counts):
        self.counts = counts

    def all_gather(self, array):
        return np.array([[c] for c in self.counts], dtype=np.float64)


def test_agree_on_batches_refuses_a_rank_without_batches():
    from qtrainer.distributed import agree_on_batches

    with pytest.raises(ValueError, match=r"rank 0: 1, rank 1: 0.*more processes than the data has batches"):
        agree_on_batches(_TwoRanks([1, 0]), "train", 1)
    assert agree_on_batches(_TwoRanks([3, 2]), "train", 3) == 2  # ranks step together


def test_more_processes_than_batches_is_refused(tmp_path):
    # both ranks raise at once: the case that used to hang (a SIGTERM deadlocked in paddle's handler)
    out = check_child(run_child("too-many", str(tmp_path), timeout=90))
    assert "RAISED ValueError" in out and "more processes than the data has batches" in out, out[-3000:]
    assert "rank 0: 0, rank 1: 0" in out
    first = min(float((tmp_path / f"failed_at.rank{r}").read_text()) for r in range(2)
                if (tmp_path / f"failed_at.rank{r}").exists())
    assert float((tmp_path / "raised_at").read_text()) - first < 60


def test_a_module_that_cannot_be_pickled_is_refused_before_spawning(tmp_path):
    trainer = Trainer(**quiet(tmp_path, strategy="ddp", devices=2))
    start = time.monotonic()
    with pytest.raises(TypeError, match=r"must pickle the module \(NotPicklable\).*lambda.*paddle.distributed.launch"):
        trainer.fit(new_net(NotPicklable), train_loader())
    assert time.monotonic() - start < 5  # no process was started


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="fsdp"), r"strategy='fsdp'\) is not supported; use one of: 'auto', 'ddp', 'single_device'"),
    (dict(strategy="ddp", devices=64), r"devices=64 processes do not fit this machine: it has \d+ CPU core.*available: 1\.\.\d+"),
    (dict(devices=0), r"devices=0.*positive int"),
    (dict(devices="two"), r"devices='two'.*positive int"),
    (dict(strategy="single_device", devices=2), r"single_device.*strategy='ddp'"),
    (dict(strategy=object()), r"got a object.*DDPStrategy"),
])
def test_strategy_and_devices_that_do_not_fit_are_refused(tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Trainer(**quiet(tmp_path, **kwargs))


def test_gpu_devices_on_a_machine_without_gpus_list_what_is_available():
    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        pytest.skip("this machine has GPUs")
    with pytest.raises(ValueError, match="no GPU.*available here: auto, cpu"):
        Trainer(device="gpu", strategy="ddp", devices=2)


def test_devices_must_match_what_the_launcher_started(monkeypatch):
    for name, value in {"PADDLE_TRAINER_ID": "0", "PADDLE_TRAINERS_NUM": "4", "PADDLE_LOCAL_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"devices=3 but paddle.distributed.launch started 2 process\(es\) on this node"):
        resolve_strategy("ddp", 3, "cpu")
    strategy = resolve_strategy("auto", "auto", "cpu")
    assert isinstance(strategy, DDPStrategy) and strategy.world_size == 4 and strategy.local_world_size == 2
    with pytest.raises(ValueError, match="independent copies"):
        resolve_strategy("single_device", "auto", "cpu")


# ------------------------------------------------------------------------- pieces, one process
def test_one_process_strategies_reduce_nothing():
    for strategy in (SingleProcess(), resolve_strategy("ddp", "auto", "cpu")):
        array = np.array([1.0, 2.0])
        np.testing.assert_array_equal(strategy.all_reduce(array, "mean"), array)
        np.testing.assert_array_equal(strategy.all_gather(array), array[None])
        assert strategy.broadcast_object({"a": 1}) == {"a": 1} and strategy.reduce_boolean_decision(True)
        assert not strategy.needs_spawn and strategy.world_size == 1
        with pytest.raises(ValueError, match="op='avg'.*sum, mean, max, min"):
            strategy.all_reduce(array, "avg")


def test_plain_loaders_are_sharded_exactly():
    loader = paddle.io.DataLoader(Points(10), batch_size=3, shuffle=False)
    seen = []
    for rank in range(2):
        sharded = shard_dataloader(loader, "validation", rank, 2)
        seen += [i for batch in sharded.batch_sampler for i in batch]
        assert sum(len(x) for x, _ in sharded) == len(range(rank, 10, 2))
    assert sorted(seen) == list(range(10))  # every sample once, no padding
    train = shard_dataloader(train_loader(), "train", 1, 2)
    assert isinstance(train.batch_sampler, paddle.io.DistributedBatchSampler)
    assert train.batch_sampler.batch_size == BATCH and train.batch_sampler.shuffle and len(train) == N_TRAIN // (2 * BATCH)
    assert shard_dataloader(loader, "predict", 1, 2) is loader
    custom = paddle.io.DataLoader(Points(10), batch_sampler=paddle.io.BatchSampler(
        sampler=paddle.io.WeightedRandomSampler([1.0] * 10, 10), batch_size=2))
    assert shard_dataloader(custom, "train", 0, 2) is custom  # the user's own sampling is kept


class _FakeRanks(SingleProcess):
    world_size = 2

    def __init__(self, counts):
        self.counts = counts

    def all_gather(self, array):
        return np.array([[c] for c in self.counts], dtype=np.float64)


def test_ranks_agree_on_the_number_of_training_batches():
    assert agree_on_batches(_FakeRanks([3, 3]), "train", 3) == 3
    assert agree_on_batches(_FakeRanks([3, 2]), "train", 3) == 2      # all ranks step together
    assert agree_on_batches(_FakeRanks([3, 2]), "validation", 3) == 3  # evaluation may differ
    with pytest.raises(ValueError, match=r"1 of the 2 processes no batch \(validation batches per rank: rank 0: 1, "
                                         r"rank 1: 0\).*more processes"):
        agree_on_batches(_FakeRanks([1, 0]), "validation", 1)
    assert agree_on_batches(_FakeRanks([0, 0]), "validation", 0) == 0  # no validation data anywhere
    with pytest.raises(ValueError, match="2 of the 2 processes no batch"):
        agree_on_batches(_FakeRanks([0, 0]), "train", 0)


def _ignore_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)


def _exit_with(code: int, delay: float) -> None:
    time.sleep(delay)
    os._exit(code)


def test_supervision_reports_the_first_failure_and_kills_what_ignores_sigterm():
    import multiprocessing

    from qtrainer.distributed import _stop, _wait_for_first_failure

    fork = multiprocessing.get_context("fork")
    finished = [fork.Process(target=_exit_with, args=(0, 0.0)) for _ in range(2)]
    for process in finished:
        process.start()
    assert _wait_for_first_failure(finished) is None
    stubborn = fork.Process(target=_ignore_sigterm_and_sleep)
    failing = fork.Process(target=_exit_with, args=(3, 0.5))
    for process in (stubborn, failing):
        process.start()
    time.sleep(0.3)  # let the stubborn one install its SIG_IGN
    assert _wait_for_first_failure([stubborn, failing]) == (1, 3)
    start = time.monotonic()
    _stop([stubborn, failing], grace=1.0)
    assert stubborn.exitcode == -signal.SIGKILL and time.monotonic() - start < 10


def test_the_earliest_error_report_is_raised(tmp_path):
    import pickle

    from qtrainer.distributed import SpawnedProcessError, _raise_child_error

    for rank, when, exc in ((0, 2.0, RuntimeError("gloo: connection reset by peer")), (1, 1.0, KeyError("x"))):
        report = (when, pickle.dumps(exc), f"traceback of rank {rank}")
        (tmp_path / f"rank{rank}.error").write_bytes(pickle.dumps(report))
    with pytest.raises(KeyError) as info:
        _raise_child_error(str(tmp_path), 2, "fit", 0, 1)
    assert isinstance(info.value.__cause__, SpawnedProcessError)
    assert "rank 1 of 2 failed (rank(s) 0 failed after it)" in str(info.value.__cause__)
    assert "traceback of rank 1" in str(info.value.__cause__)
    with pytest.raises(SpawnedProcessError, match="rank 1 of 3 terminated with signal SIGKILL without reporting"):
        _raise_child_error(str(tmp_path / "none"), 3, "fit", 1, -signal.SIGKILL)


def test_spawned_modules_keep_their_parameters_training_attributes():
    import pickle

    from qtrainer.distributed import _dumps
    from qtrainer.quant.pact import PACT

    layer = nn.Sequential(nn.Linear(2, 2), PACT(init_value=3.0, lr_mult=7.0, decay=0.1))
    layer[0].bias.stop_gradient = True
    copy = pickle.loads(_dumps(layer))
    for original, restored in zip(layer.parameters(), copy.parameters()):
        assert type(restored) is type(original) and restored.name == original.name
        assert restored.stop_gradient == original.stop_gradient
        assert restored.optimize_attr == original.optimize_attr
        assert type(restored.regularizer) is type(original.regularizer)
        np.testing.assert_array_equal(restored.numpy(), original.numpy())
    assert copy[1].alpha.optimize_attr["learning_rate"] == 7.0
    plain = pickle.loads(pickle.dumps(layer))  # what plain pickling would do
    assert not hasattr(plain[1].alpha, "optimize_attr")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    _main(sys.argv[1:])
