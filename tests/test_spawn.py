"""qtrainer/spawn.py: ``Trainer(strategy="ddp", devices=2)`` spawns, supervises and adopts rank 0's results.

Also the runs started by ``paddle.distributed.launch`` and ranks nobody supervises. The children
run ``tests/distributed_jobs.py``; the ``spawn_fit`` and ``group`` runs are fixtures in conftest.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from paddle import nn

from qtrainer import Trainer

from distributed_jobs import (
    N_TRAIN,
    BATCH,
    HERE,
    NotPicklable,
    TIMEOUT,
    assert_close,
    check_child,
    child_env,
    load_dump,
    new_net,
    quiet,
    reference_fit,
    run_child,
    train_loader,
    weights,
)


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_calling_process_gets_rank_zeros_results(spawn_fit):
    parent, parent_weights = load_dump(spawn_fit / "parent.npz")
    facts0, rank0 = load_dump(spawn_fit / "fit.rank0.npz")
    assert_close(parent_weights, rank0, atol=0)
    assert parent["step"] == facts0["step"] and parent["metrics"] == facts0["metrics"]
    assert os.path.isfile(parent["best_model_path"])
    assert os.path.dirname(os.path.dirname(parent["best_model_path"])) == parent["log_dir"]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_rank_that_dies_makes_the_spawned_run_fail_quickly(tmp_path):
    out = check_child(run_child("spawn-dies", str(tmp_path), timeout=90))
    assert "RAISED SpawnedProcessError" in out and "rank 1 of 2 terminated with signal SIGKILL" in out, out[-3000:]
    died = float((tmp_path / "died_at").read_text())
    assert float((tmp_path / "raised_at").read_text()) - died < 60


@pytest.mark.slow
def test_a_rank_that_raises_makes_the_spawned_run_fail_quickly_with_its_error(tmp_path):
    out = check_child(run_child("spawn-raises", str(tmp_path), timeout=90))
    assert "RAISED RuntimeError: rank 1 fails on purpose at step 3" in out, out[-3000:]
    # the cause is rank 1's own traceback, not rank 0's echo of it (a lost connection)
    assert "CAUSE rank 1 of 2 failed" in out and "in on_train_batch_end" in out, out[-3000:]
    failed = float((tmp_path / "failed_at.rank1").read_text())
    assert float((tmp_path / "raised_at").read_text()) - failed < 60


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _ignore_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)


def _exit_with(code: int, delay: float) -> None:
    time.sleep(delay)
    os._exit(code)


def test_supervision_reports_the_first_failure_and_kills_what_ignores_sigterm():
    import multiprocessing

    from qtrainer.spawn import _stop, _wait_for_first_failure

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

    from qtrainer.spawn import SpawnedProcessError, _raise_child_error

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

    from qtrainer.spawn import _dumps
    from qtrainer.quant.quanters.pact import PACT

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
