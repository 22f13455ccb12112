import numpy as np
import paddle
import pytest
from paddle.io import BatchSampler, DistributedBatchSampler

from image_folders import class_value, write_folder
from qtrainer.data import make_loaders
from qtrainer.data.sharding import ShardSampler


@pytest.fixture
def ten_per_split(tmp_path):
    return write_folder(tmp_path, {"train": {"a": 6, "b": 4}, "val": {"a": 3, "b": 4}})


def _fake_world(monkeypatch, world_size, rank):
    monkeypatch.setattr(paddle.distributed, "get_world_size", lambda *args: world_size)
    monkeypatch.setattr(paddle.distributed, "get_rank", lambda *args: rank)


def _indices(loader):
    return [i for batch in loader.batch_sampler for i in batch]


def test_batches_have_the_model_input_shapes(ten_per_split):
    train, val = make_loaders(ten_per_split, image_size=20, batch_size=4)
    images, labels = next(iter(train))
    assert images.shape == [4, 3, 20, 20] and images.dtype == paddle.float32
    assert labels.shape == [4] and labels.dtype == paddle.int64
    assert len(train) == 2  # 10 images, batch 4, last incomplete batch dropped


def test_val_keeps_every_image_in_a_fixed_order_that_interleaves_the_classes(ten_per_split):
    """A class-sorted folder read in order would give a first batch of one class: a limit_val_batches
    subset (or max_drop's first eval batches) would then measure one class only."""
    _, val = make_loaders(ten_per_split, image_size=16, batch_size=4, val_batch_size=3)
    labels = np.concatenate([batch[1].numpy() for batch in val])
    assert labels.tolist() == val.dataset.targets.tolist() == [0, 1, 0, 1, 0, 1, 1]
    again = make_loaders(ten_per_split, image_size=16, batch_size=4, val_batch_size=3)[1]
    assert [p for p, _ in again.dataset.samples] == [p for p, _ in val.dataset.samples]  # the same order every time
    # the pixels match the label (the generated images are uniform at the class's gray level)
    images = np.concatenate([batch[0].numpy() for batch in val])
    red = images[:, 0].mean(axis=(1, 2)) * 0.229 + 0.485
    np.testing.assert_allclose(red * 255, [class_value(label) for label in labels], atol=1.0)


def test_one_process_uses_a_shuffling_batch_sampler(ten_per_split):
    train, val = make_loaders(ten_per_split, image_size=16, batch_size=2)
    assert type(train.batch_sampler) is BatchSampler and type(val.batch_sampler) is BatchSampler
    orders = {tuple(_indices(train)) for _ in range(5)}
    assert len(orders) > 1 and all(sorted(order) == list(range(10)) for order in orders)
    assert _indices(val) == list(range(7))


def test_several_processes_shard_train_and_val(ten_per_split, monkeypatch):
    shards = []
    for rank in range(2):
        _fake_world(monkeypatch, 2, rank)
        train, val = make_loaders(ten_per_split, image_size=16, batch_size=2)
        assert isinstance(train.batch_sampler, DistributedBatchSampler)
        assert train.batch_sampler.nranks == 2 and train.batch_sampler.local_rank == rank
        assert isinstance(val.batch_sampler.sampler, ShardSampler)
        shards.append((_indices(train), _indices(val)))
    (train0, val0), (train1, val1) = shards
    assert len(train0) == len(train1) == 4 and not set(train0) & set(train1)
    assert val0 == [0, 2, 4, 6] and val1 == [1, 3, 5]  # every val image once, no padding


def test_set_epoch_reshuffles_the_distributed_train_shard(ten_per_split, monkeypatch):
    _fake_world(monkeypatch, 2, 0)
    train, _ = make_loaders(ten_per_split, image_size=16, batch_size=2)
    orders = []
    for epoch in range(4):
        train.batch_sampler.set_epoch(epoch)
        orders.append(tuple(_indices(train)))
    assert len(set(orders)) > 1


def test_the_distributed_flag_overrides_detection(ten_per_split, monkeypatch):
    _fake_world(monkeypatch, 2, 0)
    train, _ = make_loaders(ten_per_split, image_size=16, batch_size=2, distributed=False)
    assert type(train.batch_sampler) is BatchSampler and len(_indices(train)) == 10
    _fake_world(monkeypatch, 1, 0)
    train, _ = make_loaders(ten_per_split, image_size=16, batch_size=2, distributed=True)
    assert isinstance(train.batch_sampler, DistributedBatchSampler)


def test_worker_processes_give_the_same_val_batches(ten_per_split):
    _, val = make_loaders(ten_per_split, image_size=16, batch_size=4)
    _, val_workers = make_loaders(ten_per_split, image_size=16, batch_size=4, workers=2)
    for (images, labels), (images_w, labels_w) in zip(val, val_workers, strict=True):
        np.testing.assert_array_equal(images.numpy(), images_w.numpy())
        np.testing.assert_array_equal(labels.numpy(), labels_w.numpy())


def test_skip_policy_reaches_both_splits(ten_per_split):
    train, val = make_loaders(ten_per_split, image_size=16, batch_size=2, on_bad_image="skip")
    assert train.dataset.on_bad_image == val.dataset.on_bad_image == "skip"


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size=0: use a positive int"),
    (dict(val_batch_size=-1), "val_batch_size=-1: use a positive int"),
    (dict(workers=-1), r"workers=-1: use an int >= 0"),
    (dict(batch_size=11), r"has 10 images, fewer than batch_size=11 × 1 process\(es\)"),
])
def test_bad_arguments(ten_per_split, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_loaders(ten_per_split, image_size=16, **kwargs)


def test_missing_val_split_says_the_layout(tmp_path):
    root = write_folder(tmp_path, {"train": {"a": 4}})
    with pytest.raises(FileNotFoundError, match=r"val' not found.*<root>/val/<class>/<image>"):
        make_loaders(root, image_size=16, batch_size=2)


def test_val_crop_fraction_one_keeps_the_whole_image(ten_per_split):
    """crop_fraction 1.0 resizes to the crop size (no border cut); the default 0.875 cuts a border."""
    whole = make_loaders(ten_per_split, image_size=8, batch_size=2, val_crop_fraction=1.0)[1].dataset
    cropped = make_loaders(ten_per_split, image_size=8, batch_size=2)[1].dataset
    assert whole.transform.transforms[0].size == 8 and cropped.transform.transforms[0].size == 9
