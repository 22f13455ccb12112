import numpy as np
import pytest

from qtrainer.data import FashionMNISTDataset, find_fashion_mnist, load_fashion_mnist


def test_reads_the_real_files(fashion_mnist_dir):
    images, labels = load_fashion_mnist("test", fashion_mnist_dir)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.unique(labels)) == list(range(10)) and np.bincount(labels).min() == 1000
    image, label = FashionMNISTDataset("test", fashion_mnist_dir, limit=5)[0]
    assert image.shape == (1, 28, 28) and image.dtype == np.float32 and label == labels[0]


def test_missing_data_says_what_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(str(tmp_path))


def test_unknown_split():
    with pytest.raises(ValueError, match="use 'train' or 'test'"):
        load_fashion_mnist("val")
