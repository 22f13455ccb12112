"""Train and val loaders over an ImageNet-style folder, single-process or one shard per rank.

On several processes (``paddle.distributed.get_world_size() > 1``, or ``distributed=True``) the
train loader uses ``paddle.io.DistributedBatchSampler`` (each rank a different shuffled shard;
the Trainer calls its ``set_epoch`` so the shuffle changes each epoch) and the val loader gives
each rank every ``world_size``-th image without padding, so the summed metrics count every val
image exactly once. On one process they use ``paddle.io.BatchSampler``.

An image that cannot be read raises :class:`~qtrainer.data.folder.UnreadableImageError` (naming the
file, with the decoder's error as its cause) from the loop that iterates the loader, for any
``workers``, after the loader is stopped: the samples carry the error to the consumer instead of
letting Paddle's reader thread die with it (which hangs ``next()``; see ``qtrainer.data.iteration``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import paddle
from paddle.io import BatchSampler, DataLoader

from qtrainer._checks import check_positive_int
from qtrainer.data.folder import ImageFolder
from qtrainer.data.iteration import FailedSample, collate_or_fail, guard_iterator
from qtrainer.data.sharding import sharded_batch_sampler
from qtrainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform, val_transform

__all__ = ["make_loaders"]

logger = logging.getLogger(__name__)


class _LoaderImageFolder(ImageFolder):
    """An ``ImageFolder`` whose ``__getitem__`` returns a ``FailedSample`` instead of raising.

    Only the loaders of ``make_loaders`` read it: their collate function and iterator hand the
    error to the consumer (see ``qtrainer.data.iteration``).
    """

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except Exception as error:  # noqa: BLE001 - re-raised as it is by the loader's iterator
            return FailedSample(error, index)


class _Loader(DataLoader):
    """A ``DataLoader`` whose iterators raise a sample's error (see ``qtrainer.data.iteration``)."""

    def __iter__(self):
        return guard_iterator(super().__iter__())


def make_loaders(root: str, image_size: int = 224, batch_size: int = 64, workers: int = 0,
                 distributed: bool | None = None, *, val_batch_size: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 train_scale: tuple[float, float] = (0.08, 1.0), val_crop_fraction: float = 0.875,
                 on_bad_image: str = "error",
                 train_split: str = "train", val_split: str = "val") -> tuple[DataLoader, DataLoader]:
    """``(train_loader, val_loader)`` over ``root/train`` and ``root/val`` (see ``qtrainer.data.folder``).

    Batches are ``[images float32 [B, 3, image_size, image_size], labels int64 [B]]``. The train
    loader shuffles and drops the last incomplete batch; the val loader keeps every image in a fixed
    order that interleaves the classes (``ImageFolder(order="interleaved")``), so its first batches
    are a fair sample of all of them.

    Args:
        root: the ImageNet-style folder.
        image_size: the side of the square crops (train and val).
        batch_size: the train batch size per process; ``val_batch_size`` defaults to it.
        workers: loader worker processes per loader (0 decodes in the main process).
        distributed: shard the data across ranks; ``None`` does when
            ``paddle.distributed.get_world_size() > 1``.
        mean, std: per-channel normalisation of ``[0, 1]`` pixels (ImageNet's by default).
        train_scale: the area fraction range of the random resized crop.
        val_crop_fraction: the val center crop's share of the resized short side (0.875: 256 -> 224;
            1.0 keeps the whole image, for small centred images such as Fashion-MNIST).
        on_bad_image: ``"error"`` or ``"skip"`` unreadable images (see ``ImageFolder``). With
            ``"error"``, iterating a loader raises ``UnreadableImageError`` at the batch holding the
            first unreadable image, for any ``workers``.
    """
    check_positive_int("batch_size", batch_size)
    val_batch_size = batch_size if val_batch_size is None else val_batch_size
    check_positive_int("val_batch_size", val_batch_size)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r}: use an int >= 0 (0 loads in the main process)")
    world_size = paddle.distributed.get_world_size()
    rank = paddle.distributed.get_rank()
    if distributed is None:
        distributed = world_size > 1

    train_set = _LoaderImageFolder(root, train_split, train_transform(image_size, mean, std, train_scale),
                            on_bad_image=on_bad_image)
    # the classes interleaved: any first batches (limit_val_batches, a quick accuracy check) see every class
    val_set = _LoaderImageFolder(root, val_split, val_transform(image_size, mean, std, val_crop_fraction),
                                 classes=train_set.classes, on_bad_image=on_bad_image, order="interleaved")
    replicas = world_size if distributed else 1
    if len(train_set) < batch_size * replicas:
        raise ValueError(
            f"{train_set.split_dir!r} has {len(train_set)} images, fewer than batch_size={batch_size} × "
            f"{replicas} process(es): the train loader (which drops the last incomplete batch) would be empty; "
            "lower batch_size")

    if distributed:
        train_sampler = sharded_batch_sampler(train_set, "train", batch_size, rank, world_size,
                                              shuffle=True, drop_last=True)
        val_sampler = sharded_batch_sampler(val_set, "validation", val_batch_size, rank, world_size,
                                            shuffle=False, drop_last=False)
    else:
        train_sampler = BatchSampler(train_set, shuffle=True, batch_size=batch_size, drop_last=True)
        val_sampler = BatchSampler(val_set, shuffle=False, batch_size=val_batch_size, drop_last=False)
    logger.info("data %s: %d train / %d val images, %d classes, %dpx, %s",
                root, len(train_set), len(val_set), len(train_set.classes), image_size,
                f"rank {rank} of {world_size}" if distributed else "one process")
    train_loader = _Loader(train_set, batch_sampler=train_sampler, num_workers=workers, collate_fn=collate_or_fail)
    val_loader = _Loader(val_set, batch_sampler=val_sampler, num_workers=workers, collate_fn=collate_or_fail)
    return train_loader, val_loader
