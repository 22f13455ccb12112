"""samples: the self-check's inputs are drawn across the loader, not from its first batches."""
from __future__ import annotations

import numpy as np
import paddle

from qtrainer.quant.export.samples import first_inputs, spread_inputs


class _SortedByClass(paddle.io.Dataset):
    """100 images stored class by class (as an image folder is): image value = its index."""

    def __init__(self, n=100):
        super().__init__()
        self.n = n
        self.reads: list[int] = []

    def __getitem__(self, index):
        self.reads.append(index)
        return np.full([1, 2, 2], index, "float32"), np.array([index // 10], "int64")

    def __len__(self):
        return self.n


def _loader(dataset, batch_size=8):
    return paddle.io.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def test_spread_inputs_cover_the_whole_dataset_and_read_only_those_samples():
    dataset = _SortedByClass()
    batches = spread_inputs(_loader(dataset), max_batches=2)
    index = np.concatenate([b[:, 0, 0, 0] for b in batches]).astype(int)
    assert [len(b) for b in batches] == [8, 8]
    assert index[0] == 0 and index[-1] == 99  # first and last sample
    assert len({i // 10 for i in index}) == 10  # every class, although the data is sorted by class
    assert sorted(dataset.reads) == sorted(index.tolist())  # nothing else was loaded


def test_first_inputs_take_the_first_batches():
    batches = first_inputs(_loader(_SortedByClass()), 2)
    index = np.concatenate([b[:, 0, 0, 0] for b in batches]).astype(int)
    assert index.tolist() == list(range(16))


def test_a_small_dataset_is_taken_whole():
    batches = spread_inputs(_loader(_SortedByClass(n=12)), max_batches=4)
    assert np.concatenate([b[:, 0, 0, 0] for b in batches]).astype(int).tolist() == list(range(12))


def test_a_list_of_batches_gives_evenly_spaced_batches():
    batches = [np.full([2, 1], i, "float32") for i in range(10)]
    picked = spread_inputs(batches, 3)
    assert [int(b[0, 0]) for b in picked] == [0, 4, 9]  # np.linspace(0, 9, 3) rounded (4.5 -> 4)


def test_an_iterable_without_length_gives_its_first_batches():
    def gen():
        for i in range(10):
            yield np.full([2, 1], i, "float32"), np.zeros([2], "int64")

    assert [int(b[0, 0]) for b in spread_inputs(gen(), 3)] == [0, 1, 2]


def test_no_loader_or_no_batches():
    assert spread_inputs(None, 4) == [] and spread_inputs([np.zeros([1, 1])], 0) == []
