"""Starting and supervising the processes of ``Trainer(strategy="ddp", devices=N)``.

Two ways to run on several processes, with the same script:

* ``python -m paddle.distributed.launch --nproc_per_node N train.py`` (add ``--nnodes M
  --master IP:PORT`` on each node for several machines). Every process runs the whole script;
  ``Trainer()`` notices the launcher's environment and trains data-parallel (``DDPStrategy``).
* ``Trainer(strategy="ddp", devices=N)`` in a plain ``python train.py`` (one node):
  ``fit``/``validate``/``test`` start ``N`` processes with ``paddle.distributed.spawn``, each
  running the call on a pickled copy of the Trainer, the module and the loaders; afterwards the
  calling process repeats ``configure_model`` on its module (so e.g. a QAT module has the
  quantized structure) and loads rank 0's final weights, ``TrainerState`` and callback states. The
  script must guard its entry point with ``if __name__ == "__main__":`` and define its classes
  at module level (spawned processes import them); a run that cannot be pickled is refused before
  any process starts, naming the object.

When a process fails or dies, the others stop with an error instead of waiting. Under ``spawn``
this module supervises the processes itself: the first one to fail writes its error and exits at
once, the others are stopped (SIGTERM, then SIGKILL after a few seconds) and the caller re-raises
that error, within seconds. ``launch`` terminates the remaining processes of a node likewise. Without
a supervisor (a rank on another node) gloo raises "connection reset by peer" at the next
collective, or times out after about 30 seconds when a peer hangs.
"""
from __future__ import annotations

import copy
import io
import logging
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import wait
from typing import Any

import numpy as np
import paddle
from paddle.base.framework import EagerParamBase

from qtrainer._io import atomic_write_bytes

__all__ = ["spawn_run", "SpawnedProcessError"]

log = logging.getLogger(__name__)


class SpawnedProcessError(RuntimeError):
    """A process started by ``Trainer(strategy="ddp", devices=N)`` failed (its traceback is the message)."""


# ---------------------------------------------------------------------------------- pickling
def _rebuild_parameter(data: np.ndarray, name: str, stop_gradient: bool, attrs: dict[str, Any]) -> EagerParamBase:
    param = EagerParamBase.from_tensor(paddle.to_tensor(data), name=name, **attrs)
    param.stop_gradient = stop_gradient
    return param


def _rebuild_tensor(data: np.ndarray, stop_gradient: bool, persistable: bool) -> paddle.Tensor:
    tensor = paddle.to_tensor(data)
    tensor.stop_gradient = stop_gradient
    tensor.persistable = persistable
    return tensor


def _current_place():
    return paddle.framework._current_expected_place()


_PARAM_ATTRS = ("optimize_attr", "regularizer", "do_model_average", "need_clip", "is_distributed")


class _ProcessPickler(pickle.Pickler):
    """Pickles Paddle parameters with their training attributes (plain pickling turns them into
    bare tensors, losing learning-rate multipliers and regularizers) and device places as "this
    process's device"."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, EagerParamBase):
            attrs = {k: getattr(obj, k) for k in _PARAM_ATTRS if hasattr(obj, k)}
            return _rebuild_parameter, (obj.numpy(), obj.name, obj.stop_gradient, attrs)
        if isinstance(obj, paddle.Tensor):
            return _rebuild_tensor, (obj.numpy(), obj.stop_gradient, obj.persistable)
        if type(obj).__module__ == "paddle.base.libpaddle" and type(obj).__name__.endswith("Place"):
            return _current_place, ()
        return NotImplemented


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _ProcessPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _payload(trainer, model, kwargs: dict[str, Any]) -> bytes:
    """Pickle what every spawned process needs, or raise ``TypeError`` naming what cannot be."""
    nprocs = trainer.strategy.devices
    main = sys.modules.get("__main__")
    if type(model).__module__ == "__main__" and not getattr(main, "__file__", None):
        raise TypeError(
            f"Trainer(strategy='ddp', devices={nprocs}) starts processes with paddle.distributed.spawn, which import "
            f"the module's class; {type(model).__name__} is defined in an interactive session, where they cannot "
            "find it. Put the class in a .py file, or run a script with python -m paddle.distributed.launch")
    clone = copy.copy(trainer)
    clone._clear_run_objects()  # the processes build their own optimizers, wrapped model and loaders
    clone.callbacks = list(trainer.callbacks)
    owner = model._trainer
    model._trainer = None
    try:
        return _dumps((clone, model, kwargs))
    except Exception as exc:  # noqa: BLE001 - find and name the culprit below
        parts = [(f"the module ({type(model).__name__})", model)]
        parts += [(f"the callback {type(c).__name__}", c) for c in list(trainer.callbacks) + list(kwargs.get("callbacks") or [])]
        parts += [(f"the logger {type(lg).__name__}", lg) for lg in trainer.loggers]
        parts += [(f"the {name} argument ({type(value).__name__})", value) for name, value in kwargs.items()
                  if name != "callbacks"]
        culprit, error = "the Trainer", exc
        for what, obj in parts:
            try:
                _dumps(obj)
            except Exception as part_exc:  # noqa: BLE001
                culprit, error = what, part_exc
                break
        raise TypeError(
            f"Trainer(strategy='ddp', devices={nprocs}) starts {nprocs} processes with paddle.distributed.spawn, "
            f"which must pickle {culprit}, and it cannot be pickled: {type(error).__name__}: {error}. Define classes "
            "and functions at module level (no lambdas, local classes, open files or locks), or start the processes "
            f"with `python -m paddle.distributed.launch --nproc_per_node {nprocs} script.py`, which needs no pickling"
        ) from exc
    finally:
        model._trainer = owner


# ---------------------------------------------------------------------------------- spawning
_STOP_GRACE = 5.0  # seconds a process gets to end after SIGTERM before it is killed


def _error_path(result_dir: str, rank: int) -> str:
    return os.path.join(result_dir, f"rank{rank}.error")


def _report_error(result_dir: str, rank: int, exc: BaseException) -> None:
    """Write this process's exception (or its text, when it cannot be pickled) for the caller."""
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - send the text when the exception itself does not travel
        blob = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
    report = (time.time(), blob, "".join(traceback.format_exception(exc)))
    atomic_write_bytes(_error_path(result_dir, rank), pickle.dumps(report))


def _exit_now(code: int) -> None:
    """End this process at once, after flushing its output (no interpreter clean-up)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not keep the process alive
            pass
    os._exit(code)


def _run_in_process(payload: bytes, stage: str, result_dir: str) -> None:
    """What each spawned process runs: the Trainer call; rank 0 writes back what the caller adopts.

    A process that fails writes its error for the caller and exits at once: a normal exit takes
    seconds of interpreter clean-up (during which the caller stops it with SIGTERM) and could block
    on a long traceback (paddle's spawn pipes it to the caller, which reads it only after the exit).
    """
    # Paddle's crash handler catches SIGTERM and allocates memory while it reports it; a SIGTERM
    # that arrives while this process holds the allocator's lock (e.g. while it frees its objects
    # on the way out) deadlocks it for good. The caller stops surviving processes with SIGTERM,
    # so here SIGTERM ends the process at once, as it does by default.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    try:
        trainer, model, kwargs = pickle.loads(payload)
        returned = getattr(trainer, stage)(model, **kwargs)
        if trainer.is_global_zero:
            result = _final_state(trainer, model, kwargs, returned)
            atomic_write_bytes(os.path.join(result_dir, "result.pkl"), pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the caller
        try:
            _report_error(result_dir, rank, exc)
        finally:
            _exit_now(1)


def _final_state(trainer, model, kwargs: dict[str, Any], returned: Any) -> dict[str, Any]:
    """What rank 0 hands back to the calling process (see ``_adopt``)."""
    callbacks = trainer._with_run_callbacks(list(kwargs.get("callbacks") or []))
    return {
        "state_dict": {k: v.numpy() for k, v in model.state_dict().items()},
        "trainer_state": trainer.state.state_dict(),
        "callback_states": [c.state_dict() for c in callbacks],
        "returned": returned,
    }


def _wait_for_first_failure(processes: list) -> tuple[int, int] | None:
    """Wait until every process ended or one failed; return ``(rank, exit code)`` of that one."""
    running = {process.sentinel: rank for rank, process in enumerate(processes)}
    while running:
        for sentinel in wait(list(running)):
            rank = running.pop(sentinel)
            processes[rank].join()
            if processes[rank].exitcode != 0:
                return rank, processes[rank].exitcode
    return None


def _stop(processes: list, grace: float = _STOP_GRACE) -> None:
    """End every process still running: SIGTERM, then SIGKILL after ``grace`` seconds.

    SIGKILL cannot be caught or blocked, so this returns even when a process does not react to
    SIGTERM (paddle.distributed.spawn itself waits forever in that case).
    """
    running = [p for p in processes if p.exitcode is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in running:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in running:
        if process.exitcode is None:
            log.warning("spawned process %d did not end %.0f s after SIGTERM; killing it", process.pid, grace)
            process.kill()
            process.join(grace)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"terminated with signal {signal.Signals(-code).name}"
        except ValueError:
            return f"terminated with signal {-code}"
    return f"exited with code {code}"


def _raise_child_error(result_dir: str, nprocs: int, stage: str, rank: int, code: int) -> None:
    """Re-raise the first error a process reported (its traceback as the cause), or say which died."""
    reports = []
    for r in range(nprocs):
        path = _error_path(result_dir, r)
        if os.path.exists(path):
            with open(path, "rb") as handle:
                reports.append((*pickle.load(handle), r))
    if reports:  # the earliest is the cause; the others are usually its echo (e.g. a lost connection)
        _, blob, text, first = min(reports)
        others = [r for *_, r in reports if r != first]
        also = f" (rank(s) {', '.join(map(str, others))} failed after it)" if others else ""
        raise pickle.loads(blob) from SpawnedProcessError(f"rank {first} of {nprocs} failed{also}:\n{text}")
    raise SpawnedProcessError(
        f"Trainer.{stage} on {nprocs} spawned processes failed: rank {rank} of {nprocs} {_describe_exit(code)} "
        "without reporting an error (killed, or out of memory?); the other processes were stopped")


def spawn_run(trainer, stage: str, model, kwargs: dict[str, Any]) -> Any:
    """Run ``trainer.<stage>(model, **kwargs)`` on ``trainer.strategy.devices`` spawned processes.

    Returns what rank 0's call returned, after this process's ``model`` and ``trainer`` took rank
    0's final state (see the module docstring). When a process fails or dies, the others are
    stopped at once (SIGTERM, then SIGKILL after a few seconds) and the first error a process
    reported is re-raised here with that process's traceback as its cause.
    """
    nprocs = trainer.strategy.devices
    for logger in trainer.loggers:
        _ = logger.version  # fix the version directory now, so every process logs to the same one
    payload = _payload(trainer, model, kwargs)
    backend = "nccl" if trainer.device.startswith("gpu") else "gloo"
    with tempfile.TemporaryDirectory(prefix="qtrainer-spawn-") as result_dir:
        log.info("Trainer.%s: starting %d processes (%s)", stage, nprocs, backend)
        context = paddle.distributed.spawn(_run_in_process, args=(payload, stage, result_dir), nprocs=nprocs,
                                           backend=backend, join=False)
        try:
            failure = _wait_for_first_failure(context.processes)
        finally:
            _stop(context.processes)  # none left after success; the survivors of a failure (or Ctrl-C here)
        if failure is not None:
            _raise_child_error(result_dir, nprocs, stage, *failure)
        with open(os.path.join(result_dir, "result.pkl"), "rb") as handle:
            result = pickle.load(handle)
    _adopt(trainer, model, kwargs.get("callbacks"), result)
    return result["returned"]


def _adopt(trainer, model, extra_callbacks: list | None, result: dict[str, Any]) -> None:
    """Give this process's ``model``/``trainer``/callbacks rank 0's final state."""
    own = trainer.callbacks
    trainer.callbacks = trainer._with_run_callbacks(list(extra_callbacks or []))
    trainer.module, model._trainer = model, trainer
    try:
        trainer._call_hook("configure_model")  # the structure the processes trained (e.g. QAT layers)
        state = result["state_dict"]
        mine = model.state_dict()
        if set(mine) != set(state):
            raise RuntimeError(
                f"after configure_model, {type(model).__name__} here has keys that rank 0's trained module does not "
                f"(here only: {sorted(set(mine) - set(state))[:5]}, rank 0 only: {sorted(set(state) - set(mine))[:5]}); "
                "configure_model must build the same structure in every process")
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        for callback, callback_state in zip(trainer.callbacks, result["callback_states"]):
            if callback_state:
                callback.load_state_dict(callback_state)
    finally:
        trainer.callbacks = own
    trainer.state.load_state_dict(result["trainer_state"])
