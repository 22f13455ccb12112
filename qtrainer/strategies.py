"""Where a run's processes meet: the strategies, choosing one, and agreeing on batch counts.

``SingleProcess`` is the default; ``DDPStrategy`` implements the same methods on
``paddle.distributed`` (collective data parallelism: gloo on CPU, NCCL on GPU, one code path), so
the Trainer has a single loop. What the Trainer asks of a strategy:

* ``global_rank`` / ``local_rank`` / ``world_size`` / ``local_world_size`` / ``is_global_zero``;
* ``setup(device)`` before anything runs (joins the process group; returns this process's device);
* ``wrap_model(module)`` after ``configure_model`` (so quantization layers are inside the wrapper)
  and ``training_step(model, batch, batch_idx, sync_gradients)`` for every training forward;
* ``prepare_dataloader(loader, stage)`` (shards plain loaders across ranks, ``qtrainer.data.sharding``);
* ``all_reduce(array, op)``, ``all_gather(array)``, ``broadcast_object(obj)``,
  ``reduce_boolean_decision(bool)`` and ``barrier()`` on NumPy arrays and Python objects.

:func:`resolve_strategy` turns ``Trainer(strategy=..., devices=...)`` into one; how several
processes are started is in ``qtrainer.spawn``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import numpy as np
import paddle
import paddle.distributed as dist
from paddle import nn

from qtrainer._checks import check_positive_int
from qtrainer.data.sharding import shard_dataloader
from qtrainer.device import default_num_threads

__all__ = ["SingleProcess", "DDPStrategy", "REDUCE_OPS", "STRATEGIES", "launched_world_size", "resolve_strategy",
           "available_devices", "agree_on_batches"]

log = logging.getLogger(__name__)

REDUCE_OPS = ("sum", "mean", "max", "min")
STRATEGIES = ("auto", "ddp", "single_device")


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"all_reduce(op={op!r}): use one of {', '.join(REDUCE_OPS)}")


def _check_devices(devices: Any, owner: str) -> None:
    if devices != "auto":
        check_positive_int("devices", devices, hint=" (processes on this node) or 'auto'", owner=owner)


def launched_world_size() -> int:
    """The number of processes of the job this process was started in (1 when not launched).

    ``python -m paddle.distributed.launch`` and ``paddle.distributed.spawn`` set
    ``PADDLE_TRAINERS_NUM`` and ``PADDLE_TRAINER_ID`` in every process they start.
    """
    if "PADDLE_TRAINER_ID" not in os.environ:
        return 1
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


class SingleProcess:
    """One process, one device: every reduction is the identity."""

    global_rank = 0
    local_rank = 0
    world_size = 1
    local_world_size = 1

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def needs_spawn(self) -> bool:
        """True when ``fit``/``validate``/``test`` must start the processes themselves."""
        return False

    def setup(self, device: str) -> str:
        """Prepare the process group; return the device this process computes on."""
        return device

    def wrap_model(self, module):
        """The object ``training_step`` runs through (a ``paddle.DataParallel`` in a distributed run)."""
        return module

    def training_step(self, model, batch: Any, batch_idx: int, sync_gradients: bool = True):
        """Run the module's ``training_step`` through ``model`` (what ``wrap_model`` returned).

        ``sync_gradients=False`` marks a micro-batch of gradient accumulation whose gradients
        need not be reduced across ranks yet.
        """
        return model.training_step(batch, batch_idx)

    def prepare_dataloader(self, loader, stage: str):
        """The loader this rank iterates for ``stage`` (``"train"``, ``"validation"``, ``"test"``...)."""
        return loader

    def all_reduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        """Reduce ``array`` element-wise across ranks with ``op`` (one of ``REDUCE_OPS``)."""
        _check_op(op)
        return np.asarray(array)

    def all_gather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's ``array`` stacked along a new first axis (rank order)."""
        return np.asarray(array)[None]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (a picklable Python object)."""
        return obj

    def reduce_boolean_decision(self, decision: bool) -> bool:
        """True when any rank decided True (so that all ranks stop together)."""
        return bool(decision)

    def barrier(self) -> None:
        """Wait until every rank gets here."""


class DDPStrategy(SingleProcess):
    """Data-parallel training on ``paddle.distributed`` (collective ``paddle.DataParallel``).

    Processes come from either of two launchers:

    * ``python -m paddle.distributed.launch --nproc_per_node N script.py`` (single or multi node,
      ``--nnodes``/``--master``): rank and world size are read from the environment it sets;
    * ``Trainer(strategy="ddp", devices=N)`` run as a plain script: ``fit``/``validate``/``test``
      start ``N`` processes on this node with ``paddle.distributed.spawn`` (see
      ``qtrainer.spawn``), and the calling process gets rank 0's results back.

    Each process computes on one device: ``cpu`` with the gloo backend, or its own GPU
    (``gpu:<local rank>``, or ``FLAGS_selected_gpus``) with NCCL. The model is wrapped in
    ``paddle.DataParallel`` after ``configure_model``; its forward runs the module's
    ``training_step`` (DataParallel only reduces gradients of forwards that go through it), and
    micro-batches of gradient accumulation run under ``no_sync``.

    Args:
        devices: processes per node (``"auto"``: what the launcher started, or the GPUs of this
            machine, or 1 on a CPU).
        find_unused_parameters: let DataParallel find parameters that get no gradient in a step
            (costs a graph traversal per step; needed when the set of used parameters changes
            between steps). Turned on by itself, and logged, when a sublayer of the module says
            it may leave parameters unused (``may_leave_parameters_unused`` true, e.g. PACT
            during its data-driven warm-up).
        replace_sampler: give plain ``paddle.io.DataLoader``s (a ``BatchSampler`` over a map-style
            dataset) one shard per rank: a ``DistributedBatchSampler`` for training (same batch
            size per rank, so the global batch is ``world_size`` times larger), and every
            ``world_size``-th sample without padding for validation/test (exact metrics).
        comm_buffer_size: DataParallel's gradient bucket size in MB.
    """

    def __init__(
        self,
        devices: int | str = "auto",
        *,
        find_unused_parameters: bool = False,
        replace_sampler: bool = True,
        comm_buffer_size: int = 25,
    ) -> None:
        _check_devices(devices, "DDPStrategy")
        self.devices = devices
        self.find_unused_parameters = bool(find_unused_parameters)
        self.replace_sampler = bool(replace_sampler)
        self.comm_buffer_size = comm_buffer_size
        self._announced: set[str] = set()

    # -- where this process is -----------------------------------------------------------
    @property
    def launched(self) -> bool:
        """True inside a process started by ``paddle.distributed.launch`` or ``spawn``."""
        return "PADDLE_TRAINER_ID" in os.environ

    @property
    def global_rank(self) -> int:  # type: ignore[override]
        return int(os.environ.get("PADDLE_TRAINER_ID", "0"))

    @property
    def world_size(self) -> int:  # type: ignore[override]
        return launched_world_size()

    @property
    def local_rank(self) -> int:  # type: ignore[override]
        for name in ("PADDLE_LOCAL_RANK", "PADDLE_RANK_IN_NODE"):
            if name in os.environ:
                return int(os.environ[name])
        return self.global_rank  # paddle.distributed.spawn: one node

    @property
    def local_world_size(self) -> int:  # type: ignore[override]
        if "PADDLE_LOCAL_SIZE" in os.environ:
            return int(os.environ["PADDLE_LOCAL_SIZE"])
        return self.world_size if self.launched else 1  # spawn: one node

    @property
    def needs_spawn(self) -> bool:
        return not self.launched and isinstance(self.devices, int) and self.devices > 1

    # -- set-up --------------------------------------------------------------------------
    def setup(self, device: str) -> str:
        if device.startswith("gpu"):
            device = f"gpu:{int(os.environ.get('FLAGS_selected_gpus', str(self.local_rank)).split(',')[0])}"
        if self.world_size > 1 and not dist.is_initialized():
            # one code path: the backend follows the device (a GPU build may still train on CPU)
            os.environ["PADDLE_DISTRI_BACKEND"] = "nccl" if device.startswith("gpu") else "gloo"
            dist.init_parallel_env()
            log.info("joined the process group: rank %d of %d (%s, %s)", self.global_rank, self.world_size,
                     device, os.environ["PADDLE_DISTRI_BACKEND"])
        return device

    def wrap_model(self, module):
        if self.world_size == 1:
            return module
        return paddle.DataParallel(_TrainingStepForward(module), comm_buffer_size=self.comm_buffer_size,
                                   find_unused_parameters=self.finds_unused_parameters(module))

    def finds_unused_parameters(self, module: nn.Layer) -> bool:
        """Whether DataParallel must look for unused parameters in ``module``: asked, or declared
        by one of its layers (``may_leave_parameters_unused``)."""
        if self.find_unused_parameters:
            return True
        declaring = [name for name, layer in module.named_sublayers()
                     if getattr(layer, "may_leave_parameters_unused", False)]
        if declaring and "unused" not in self._announced:
            self._announced.add("unused")
            log.info("DataParallel looks for unused parameters: %s may leave some without a gradient",
                     ", ".join(declaring[:3]) + (" ..." if len(declaring) > 3 else ""))
        return bool(declaring)

    def training_step(self, model, batch: Any, batch_idx: int, sync_gradients: bool = True):
        if not isinstance(model, paddle.DataParallel):
            return model.training_step(batch, batch_idx)
        with contextlib.nullcontext() if sync_gradients else model.no_sync():
            return model(batch, batch_idx)

    def prepare_dataloader(self, loader, stage: str):
        if self.world_size == 1 or not self.replace_sampler:
            return loader
        sharded = shard_dataloader(loader, stage, self.global_rank, self.world_size)
        if sharded is not loader and stage not in self._announced and self.is_global_zero:
            self._announced.add(stage)
            log.info("the %s loader now gives each of the %d ranks its own shard", stage, self.world_size)
        return sharded

    # -- collectives -----------------------------------------------------------------------
    def all_reduce(self, array: np.ndarray, op: str = "sum") -> np.ndarray:
        _check_op(op)
        array = np.asarray(array)
        if self.world_size == 1:
            return array
        dtype = array.dtype
        flat = array.reshape(-1).astype(np.int64 if dtype == np.bool_ else dtype, copy=False)
        tensor = paddle.to_tensor(flat)
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                     "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(tensor, op=reduce_op)
        out = tensor.numpy().reshape(array.shape)
        if op == "mean":
            out = out / self.world_size
        return out.astype(dtype, copy=False) if dtype == np.bool_ else out

    def all_gather(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if self.world_size == 1:
            return array[None]
        parts: list = []
        dist.all_gather(parts, paddle.to_tensor(array.reshape(-1)))
        return np.stack([p.numpy().reshape(array.shape) for p in parts])

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def reduce_boolean_decision(self, decision: bool) -> bool:
        return bool(self.all_reduce(np.array([int(bool(decision))], dtype=np.int64), "max")[0])

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def __repr__(self) -> str:
        return f"DDPStrategy(devices={self.devices!r}, rank {self.global_rank} of {self.world_size})"


class _TrainingStepForward(nn.Layer):
    """The layer DataParallel wraps: its forward is the module's ``training_step``."""

    def __init__(self, module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch, batch_idx):
        return self.module.training_step(batch, batch_idx)


# -- choosing a strategy ------------------------------------------------------------------
def available_devices(device: str) -> int:
    """How many processes this machine can give one device each: GPUs, or CPU cores."""
    if device.startswith("gpu"):
        return paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
    return default_num_threads()


def resolve_strategy(strategy: Any, devices: int | str, device: str) -> SingleProcess:
    """The strategy object for ``Trainer(strategy=..., devices=...)`` on ``device``.

    ``strategy``: ``"auto"``/None (data-parallel when started by ``paddle.distributed.launch`` or
    when ``devices > 1``, else one process), ``"ddp"``, ``"single_device"``, or a strategy
    instance. ``devices``: processes per node, an int or ``"auto"``.
    """
    _check_devices(devices, "Trainer")
    launched = launched_world_size()
    if strategy is None or strategy == "auto":
        strategy = "ddp" if launched > 1 or (isinstance(devices, int) and devices > 1) else "single_device"
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"Trainer(strategy={strategy!r}) is not supported; use one of: "
                             f"{', '.join(map(repr, STRATEGIES))} or a qtrainer.strategies.DDPStrategy instance")
        if strategy == "single_device":
            if devices not in ("auto", 1):
                raise ValueError(f"Trainer(strategy='single_device', devices={devices!r}): one process uses one "
                                 "device; use strategy='ddp' for several")
            if launched > 1:
                raise ValueError(f"Trainer(strategy='single_device') in a job of {launched} processes started by "
                                 "paddle.distributed.launch would train {launched} independent copies; use "
                                 "strategy='auto' or 'ddp'")
            return SingleProcess()
        strategy = DDPStrategy(devices)
    elif not isinstance(strategy, SingleProcess):
        raise TypeError(f"Trainer(strategy=...) got a {type(strategy).__name__}; use one of "
                        f"{', '.join(map(repr, STRATEGIES))} or a qtrainer.strategies.DDPStrategy instance")
    elif devices != "auto" and isinstance(strategy, DDPStrategy) and strategy.devices not in ("auto", devices):
        raise ValueError(f"Trainer(devices={devices!r}) disagrees with {strategy!r}; give the number once")
    elif devices != "auto" and isinstance(strategy, DDPStrategy):
        strategy.devices = devices
    if isinstance(strategy, DDPStrategy):
        _check_devices_fit(strategy, device, launched)
    return strategy


def _check_devices_fit(strategy: DDPStrategy, device: str, launched: int) -> None:
    kind = "GPU" if device.startswith("gpu") else "CPU core"
    if launched > 1:
        local = strategy.local_world_size
        if strategy.devices not in ("auto", local):
            raise ValueError(
                f"devices={strategy.devices!r} but paddle.distributed.launch started {local} process(es) on this "
                f"node ({launched} in all); use devices='auto' or devices={local}, or change --nproc_per_node")
        return
    available = available_devices(device)
    if strategy.devices == "auto":
        strategy.devices = max(1, available) if device.startswith("gpu") else 1
        return
    if strategy.devices > available:
        where = (f"gpu:0..gpu:{available - 1}" if available else "none") if device.startswith("gpu") \
            else f"1..{available} process(es), one per core"
        raise ValueError(
            f"devices={strategy.devices} processes do not fit this machine: it has {available} {kind}(s) available "
            f"to this process (device={device!r}); available: {where}. Use a smaller devices, device='cpu' or "
            "'gpu', or several nodes with paddle.distributed.launch --nnodes")


def agree_on_batches(strategy: SingleProcess, stage: str, count: float) -> float:
    """The number of ``stage`` batches this rank runs, checked against the other ranks.

    Every rank must call it. Raises ``ValueError`` when some rank has no batch (more processes
    than the data has batches; for evaluation, unless no rank has any). Training needs the same
    count on every rank (each step reduces gradients): the smallest is used, with a warning when
    they differ. Evaluation counts may differ.
    """
    world = strategy.world_size
    if world == 1:
        return count
    counts = strategy.all_gather(np.array([count], dtype=np.float64))[:, 0]
    if counts.max() == 0 and stage != "train":
        return count
    per_rank = ", ".join(f"rank {r}: {int(c) if np.isfinite(c) else 'unknown'}" for r, c in enumerate(counts))
    if counts.min() == 0:
        raise ValueError(
            f"the {stage} data gives {int((counts == 0).sum())} of the {world} processes no batch "
            f"({stage} batches per rank: {per_rank}): "
            f"there are more processes than the data has batches. Use fewer processes, a smaller batch_size, "
            f"more data, or a larger limit_{'train' if stage == 'train' else 'val'}_batches")
    if stage == "train" and counts.min() != counts.max():
        if strategy.is_global_zero:
            log.warning("ranks have different numbers of training batches (%s); every rank runs %d per epoch so "
                        "that they step together", per_rank, int(counts.min()))
        return float(counts.min())
    return count
