"""qtrainer/data/sharding.py: one shard per rank, every sample once."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from qtrainer.data.sharding import ShardSampler, set_sampler_epoch, shard_dataloader, sharded_batch_sampler


class Indices(paddle.io.Dataset):
    """Sample ``i`` is ``i`` (so a batch says which samples it holds)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return np.array([i], dtype="int64")


def test_plain_loaders_are_sharded_exactly():
    loader = paddle.io.DataLoader(Indices(10), batch_size=3, shuffle=False)
    seen = []
    for rank in range(2):
        sharded = shard_dataloader(loader, "validation", rank, 2)
        samples = [int(i) for batch in sharded for i in batch.numpy().reshape(-1)]
        assert samples == list(range(rank, 10, 2))
        seen += samples
    assert sorted(seen) == list(range(10))  # every sample once, no padding
    train = shard_dataloader(paddle.io.DataLoader(Indices(48), batch_size=4, shuffle=True), "train", 1, 2)
    assert isinstance(train.batch_sampler, paddle.io.DistributedBatchSampler)
    assert train.batch_sampler.batch_size == 4 and train.batch_sampler.shuffle and len(train) == 6
    assert shard_dataloader(loader, "predict", 1, 2) is loader
    custom = paddle.io.DataLoader(Indices(10), batch_sampler=paddle.io.BatchSampler(
        sampler=paddle.io.WeightedRandomSampler([1.0] * 10, 10), batch_size=2))
    assert shard_dataloader(custom, "train", 0, 2) is custom  # the user's own sampling is kept


def test_shard_sampler_gives_every_world_size_th_index_without_padding():
    assert list(ShardSampler(Indices(7), 1, 3)) == [1, 4] and len(ShardSampler(Indices(7), 1, 3)) == 2
    with pytest.raises(ValueError, match=r"rank=2: use 0 <= rank < world_size=2"):
        ShardSampler(Indices(7), 2, 2)


def test_sharded_batch_sampler_by_stage():
    train = sharded_batch_sampler(Indices(8), "train", 2, 0, 2, shuffle=False, drop_last=True)
    assert isinstance(train, paddle.io.DistributedBatchSampler) and list(train) == [[0, 1], [4, 5]]  # paddle: blocks of batch_size
    val = sharded_batch_sampler(Indices(5), "test", 2, 1, 2, shuffle=False, drop_last=False)
    assert type(val) is paddle.io.BatchSampler and list(val) == [[1, 3]]


def test_set_sampler_epoch_reaches_the_distributed_sampler():
    loader = shard_dataloader(paddle.io.DataLoader(Indices(16), batch_size=2, shuffle=True), "train", 0, 2)
    def order(epoch):
        set_sampler_epoch(loader, epoch)
        return list(loader.batch_sampler)

    assert order(1) == order(1) != order(0)  # the shuffle follows the epoch it is told
    set_sampler_epoch([1, 2], 3)  # a loader without a sampler: nothing to tell
