"""One shard of the data per rank: the samplers and the loader rewrite the distributed strategy uses."""
from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from paddle.io import BatchSampler, DataLoader, DistributedBatchSampler, RandomSampler, Sampler, SequenceSampler

__all__ = ["ShardSampler", "sharded_batch_sampler", "shard_dataloader", "set_sampler_epoch"]

log = logging.getLogger(__name__)


class ShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...`` of a dataset, in order, without padding."""

    def __init__(self, dataset, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}: use 0 <= rank < world_size={world_size}")
        self.num_samples, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def sharded_batch_sampler(dataset, stage: str, batch_size: int, rank: int, world_size: int, *,
                          shuffle: bool, drop_last: bool) -> BatchSampler:
    """This rank's batches of ``dataset``: for ``"train"`` a ``DistributedBatchSampler`` (same batch
    size per rank, shuffled by epoch when ``shuffle``), otherwise every ``world_size``-th sample in
    order without padding, so metrics summed over ranks count every sample once."""
    if stage == "train":
        return DistributedBatchSampler(dataset, batch_size, num_replicas=world_size, rank=rank,
                                       shuffle=shuffle, drop_last=drop_last)
    return BatchSampler(sampler=ShardSampler(dataset, rank, world_size), batch_size=batch_size, drop_last=drop_last)


def shard_dataloader(loader: Any, stage: str, rank: int, world_size: int) -> Any:
    """``loader`` with one shard per rank, when it is a plain ``paddle.io.DataLoader``.

    A ``BatchSampler`` over a map-style dataset (shuffled or in order) is replaced by
    :func:`sharded_batch_sampler`'s. Other loaders (a ``DistributedBatchSampler`` already, a custom
    sampler, an iterable dataset, or ``predict``) are returned unchanged.
    """
    if not isinstance(loader, DataLoader) or stage == "predict":
        return loader
    sampler = loader.batch_sampler
    if isinstance(sampler, DistributedBatchSampler):
        return loader
    if type(sampler) is not BatchSampler or not isinstance(sampler.sampler, (RandomSampler, SequenceSampler)):
        if rank == 0:
            log.warning("the %s loader's sampler (%s) is not sharded across the %d ranks: each rank reads what it "
                        "yields; give each rank its own shard (e.g. paddle.io.DistributedBatchSampler)",
                        stage, type(sampler).__name__, world_size)
        return loader
    clone = copy.copy(loader)
    clone.batch_sampler = sharded_batch_sampler(loader.dataset, stage, sampler.batch_size, rank, world_size,
                                                shuffle=isinstance(sampler.sampler, RandomSampler),
                                                drop_last=sampler.drop_last)
    clone._iterator = None
    return clone


def set_sampler_epoch(loader: Iterable, epoch: int) -> None:
    """Tell the loader's (batch) sampler the epoch, when it has ``set_epoch`` (distributed shuffles)."""
    for attr in ("batch_sampler", "sampler"):
        sampler = getattr(loader, attr, None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return
