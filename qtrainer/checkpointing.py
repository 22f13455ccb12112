"""Dump and restore a Trainer: what goes into a checkpoint file and how a run resumes from one.

A checkpoint (a dict of plain Python and NumPy data, written by ``qtrainer.checkpoint_io``) holds
the model weights, the optimizers, schedulers and grad scaler, the ``TrainerState``
(``trainer_state``), the epoch's training-metric sums, the RNG states, every callback's state under
its ``state_key`` and the versions. Restoring is split in two, around ``configure_optimizers``:
:func:`restore_module` (callback states, weights, trainer state; after ``configure_model``) and
:func:`restore_training_state` (optimizers, schedulers, metric sums). Files of format 1 (before
``TrainerState``) are upgraded on load.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import paddle

from qtrainer._version import __version__
from qtrainer.checkpoint_io import FORMAT_VERSION, CheckpointError, load_checkpoint_file, save_checkpoint_file
from qtrainer.optim import load_portable_optimizer_state, portable_optimizer_state
from qtrainer.rng import capture_rng_state

__all__ = ["save_checkpoint", "dump_checkpoint", "load_checkpoint", "restore", "restore_module",
           "restore_training_state", "resolve_ckpt_path"]

log = logging.getLogger(__name__)


# -- writing ---------------------------------------------------------------------------------
def save_checkpoint(trainer, filepath: str) -> None:
    """Write ``trainer``'s full checkpoint to ``filepath`` (rank 0 writes; every rank calls this)."""
    train_results = _train_results_over_ranks(trainer)
    if trainer.is_global_zero:
        checkpoint = dump_checkpoint(trainer)
        checkpoint["train_results"] = train_results
        _check_finite_weights(checkpoint["state_dict"], filepath)
        save_checkpoint_file(checkpoint, filepath)
    trainer.strategy.barrier()


def dump_checkpoint(trainer) -> dict[str, Any]:
    """The checkpoint dict of ``trainer`` now; fires ``on_save_checkpoint`` (callbacks, then module)."""
    module = trainer.module
    trainer_state = trainer.state.checkpoint_dict()
    if trainer_state["epoch_finished"]:
        trainer_state["batches_done"] = 0
    checkpoint: dict[str, Any] = {
        "qtrainer_checkpoint": FORMAT_VERSION,
        "qtrainer_version": __version__,
        "paddle_version": paddle.__version__,
        "trainer_state": trainer_state,
        "state_dict": {k: v.numpy() for k, v in module.state_dict().items()},
        "optimizer_states": [portable_optimizer_state(o, module) for o in trainer.optimizers],
        "lr_schedulers": [c["scheduler"].state_dict() for c in trainer.lr_schedulers],
        "grad_scaler": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "rng": capture_rng_state(),
        "train_results": trainer._train_results.state_dict(),
        "callbacks": {},
    }
    for callback in trainer.callbacks:
        state = callback.state_dict()
        if not state:
            continue
        if callback.state_key in checkpoint["callbacks"]:
            raise ValueError(
                f"two callbacks share the checkpoint state key {callback.state_key!r} "
                f"({type(callback).__name__}); give them different arguments so their states can be told apart"
            )
        checkpoint["callbacks"][callback.state_key] = state
    trainer._call_hook("on_save_checkpoint", checkpoint)
    return checkpoint


def _train_results_over_ranks(trainer) -> dict[str, Any]:
    """The epoch's training-metric sums so far, over all ranks (a resumed rank 0 continues from them)."""
    state = trainer._train_results.state_dict()
    if trainer.world_size == 1:
        return state
    strategy = trainer.strategy
    for name in sorted(state):
        entry = state[name]
        sums = strategy.all_reduce(np.array([entry["total"], entry["weight"]], dtype=np.float64), "sum")
        entry["total"], entry["weight"] = float(sums[0]), float(sums[1])
        if entry["reduce_fx"] in ("max", "min"):
            entry["extreme"] = float(strategy.all_reduce(np.array([entry["extreme"]], dtype=np.float64),
                                                         entry["reduce_fx"])[0])
    return state


def _check_finite_weights(state_dict: dict[str, np.ndarray], path: str) -> None:
    bad = [name for name, value in state_dict.items()
           if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()]
    if bad:
        raise FloatingPointError(f"refusing to write checkpoint {path!r}: non-finite values in {bad[:10]}")


# -- reading ---------------------------------------------------------------------------------
def load_checkpoint(path: str) -> dict[str, Any]:
    """Read and verify ``path``; a format-1 checkpoint is returned in today's layout."""
    checkpoint = load_checkpoint_file(path)
    if checkpoint["qtrainer_checkpoint"] == 1:  # data seed and running loss were top-level keys
        checkpoint["trainer_state"] = {**checkpoint["trainer_state"],
                                       "data_seed": checkpoint.pop("data_seed"),
                                       "running_loss": checkpoint.pop("running_loss", [])}
        checkpoint["qtrainer_checkpoint"] = FORMAT_VERSION
    return checkpoint


def restore(trainer, ckpt_path: str, resume: bool) -> dict[str, Any]:
    """Find (``"last"`` too), read and apply :func:`restore_module` of ``ckpt_path``; return the checkpoint."""
    path = resolve_ckpt_path(trainer, ckpt_path)
    checkpoint = load_checkpoint(path)
    restore_module(trainer, checkpoint, path, resume)
    return checkpoint


def upgrade_state_dict(module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Let each sublayer rename or convert its entries of an older ``state_dict`` in place.

    A layer whose buffers changed name between versions defines
    ``upgrade_state_dict(state_dict, prefix)``; it is called with the layer's key prefix (e.g.
    ``"net.0.act_quanter.observer."``) before the keys are checked, so checkpoints of earlier
    versions still load. Returns ``state_dict``.
    """
    for name, layer in module.named_sublayers():
        upgrade = getattr(layer, "upgrade_state_dict", None)
        if callable(upgrade):
            upgrade(state_dict, f"{name}.")
    return state_dict


def restore_module(trainer, checkpoint: dict[str, Any], path: str, resume: bool) -> None:
    """Weights; for a resumed fit (``resume``) first ``on_load_checkpoint`` and the callback states,
    then the trainer state. Runs after ``configure_model``, before the optimizers exist."""
    module = trainer.module
    if resume:
        trainer._call_hook("on_load_checkpoint", checkpoint)
        for callback in trainer.callbacks:
            state = checkpoint["callbacks"].get(callback.state_key)
            if state is not None:
                callback.load_state_dict(state)
    state_dict = upgrade_state_dict(module, dict(checkpoint["state_dict"]))
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path!r} does not match {type(module).__name__}: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]} (was it saved with different callbacks, e.g. without QAT?)"
        )
    for key, value in state_dict.items():
        if list(own[key].shape) != list(value.shape):
            raise CheckpointError(f"checkpoint {path!r}: {key} has shape {list(value.shape)}, "
                                  f"the model expects {list(own[key].shape)}")
    module.set_state_dict({k: paddle.to_tensor(v) for k, v in state_dict.items()})
    if resume:
        saved = dict(checkpoint["trainer_state"])
        finished = saved.pop("epoch_finished")
        trainer.state.load_state_dict({**saved, "epoch": saved["epoch"] + (1 if finished else 0),
                                       "batches_done": 0, "epoch_finished": False})
        trainer._resume = {"batches_done": 0 if finished else saved["batches_done"], "rng": checkpoint["rng"]}


def restore_training_state(trainer, checkpoint: dict[str, Any]) -> None:
    """Optimizers, schedulers, grad scaler and the epoch's metric sums (after ``configure_optimizers``)."""
    states = checkpoint["optimizer_states"]
    if len(states) != len(trainer.optimizers):
        raise CheckpointError(f"the checkpoint has {len(states)} optimizer states; "
                              f"configure_optimizers made {len(trainer.optimizers)}")
    for optimizer, state in zip(trainer.optimizers, states):
        load_portable_optimizer_state(optimizer, trainer.module, state)
    for config, state in zip(trainer.lr_schedulers, checkpoint["lr_schedulers"]):
        config["scheduler"].set_state_dict(state)
    if trainer.grad_scaler is not None and checkpoint.get("grad_scaler"):
        trainer.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
    if trainer._resume and trainer._resume["batches_done"]:
        if trainer.is_global_zero:  # the saved sums are over all ranks: the others start from zero
            trainer._train_results.load_state_dict(checkpoint["train_results"])
        else:
            trainer._train_results.reset()


# -- finding -----------------------------------------------------------------------------------
def resolve_ckpt_path(trainer, ckpt_path: str) -> str:
    """``ckpt_path`` itself, or for ``"last"`` the newest checkpoint of the checkpoint callbacks'
    directories; when those hold none and a directory is the default ``<log_dir>/checkpoints``,
    the newest in the other runs of that logger (``<root_dir>/version_*/checkpoints``): a new
    Trainer logs to a new ``version_N`` while the run to resume wrote an earlier one."""
    if ckpt_path != "last":
        return ckpt_path
    checkpointers = trainer.checkpoint_callbacks
    searched = [c.dirpath for c in checkpointers if c.dirpath]
    candidates = [f for d in searched for f in _checkpoint_files(d)]
    if not candidates:
        patterns, others = _other_runs_checkpoint_dirs(trainer.loggers, searched)
        searched += patterns
        candidates = [f for d in others for f in _checkpoint_files(d)]
        if candidates:
            log.info("ckpt_path='last': no checkpoint in this run's %s; resuming from the newest in %s",
                     checkpointers[0].dirpath, others)
    if not candidates:
        where = (f"looked in {searched}" if searched else
                 "this Trainer has no ModelCheckpoint (enable_checkpointing=False and none in callbacks)")
        raise CheckpointError(f"ckpt_path='last' but no checkpoint (*.ckpt) was found: {where}; "
                              "pass ckpt_path=<path of a .ckpt file> instead")
    return max(candidates, key=os.path.getmtime)


def _other_runs_checkpoint_dirs(loggers: list, dirs: list[str]) -> tuple[list[str], list[str]]:
    """``(patterns, found)``: ``<root>/*/checkpoints`` and the existing ``<root>/<run>/checkpoints``
    of the loggers' other runs, for each of ``dirs`` that is a logger's default ``<log_dir>/checkpoints``."""
    patterns, found = [], []
    for logger in loggers:
        root, log_dir = getattr(logger, "root_dir", None), logger.log_dir
        if root is None or log_dir is None:
            continue
        default = os.path.join(log_dir, "checkpoints")
        if not any(os.path.abspath(d) == os.path.abspath(default) for d in dirs):
            continue
        patterns.append(os.path.join(root, "*", "checkpoints"))
        for run in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            candidate = os.path.join(root, run, "checkpoints")
            if os.path.abspath(candidate) != os.path.abspath(default) and os.path.isdir(candidate):
                found.append(candidate)
    return patterns, found


def _checkpoint_files(directory: str) -> list[str]:
    """The finished ``*.ckpt`` files in ``directory`` (none when it does not exist; temp files are hidden)."""
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, f) for f in os.listdir(directory)
            if f.endswith(".ckpt") and not f.startswith(".")]
