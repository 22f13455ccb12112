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


def test_download_uses_paddles_downloader_and_urls(tmp_path, monkeypatch):
    import paddle.dataset.common
    from paddle.vision.datasets import FashionMNIST

    from qtrainer.data import download_fashion_mnist

    calls = []

    def fake_download(url, module_name, md5sum, save_name=None):
        calls.append((url, module_name, md5sum))
        return str(tmp_path / module_name / url.rsplit("/", 1)[-1])

    monkeypatch.setattr(paddle.dataset.common, "download", fake_download)
    assert download_fashion_mnist() == str(tmp_path / FashionMNIST.NAME)
    assert calls == [(FashionMNIST.TRAIN_IMAGE_URL, "fashion-mnist", FashionMNIST.TRAIN_IMAGE_MD5),
                     (FashionMNIST.TRAIN_LABEL_URL, "fashion-mnist", FashionMNIST.TRAIN_LABEL_MD5),
                     (FashionMNIST.TEST_IMAGE_URL, "fashion-mnist", FashionMNIST.TEST_IMAGE_MD5),
                     (FashionMNIST.TEST_LABEL_URL, "fashion-mnist", FashionMNIST.TEST_LABEL_MD5)]
