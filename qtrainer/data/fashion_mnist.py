"""Fashion-MNIST (70,000 real 28×28 grayscale images of 10 clothing classes), read locally.

The files come from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``),
from Paddle's own dataset downloader (``download_fashion_mnist``, into ``~/.cache/paddle/dataset``),
or any directory holding the four original ``*-ubyte.gz`` files (``root=`` or the
``QTRAINER_FASHION_MNIST`` environment variable).
"""
from __future__ import annotations

import gzip
import logging
import os

import numpy as np
import paddle

__all__ = ["CLASSES", "download_fashion_mnist", "find_fashion_mnist", "load_fashion_mnist", "FashionMNISTDataset"]

logger = logging.getLogger(__name__)

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MEAN, STD = 0.2860, 0.3530


def find_fashion_mnist(root: str | None = None) -> str:
    """The directory holding the Fashion-MNIST files; a clear error says how to get them."""
    candidates = [root] if root else [os.environ.get("QTRAINER_FASHION_MNIST"), DEBIAN_DIR]
    for directory in filter(None, candidates):
        if all(os.path.isfile(os.path.join(directory, f)) for pair in _FILES.values() for f in pair):
            return directory
    looked = ", ".join(filter(None, candidates))
    raise FileNotFoundError(
        f"Fashion-MNIST not found (looked in: {looked}). Install it with "
        "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four *-ubyte.gz files "
        "in a directory and pass it as root= or set QTRAINER_FASHION_MNIST."
    )


def download_fashion_mnist() -> str:
    """Fetch the four files with Paddle's dataset downloader (needs the network); their directory.

    Uses the URLs and MD5 sums of ``paddle.vision.datasets.FashionMNIST`` and the downloader it
    uses (``paddle.dataset.common.download``), without parsing the images into PIL objects. Files
    already downloaded with the right MD5 sum are reused without the network.
    """
    from paddle.dataset.common import download
    from paddle.vision.datasets import FashionMNIST

    files = [(FashionMNIST.TRAIN_IMAGE_URL, FashionMNIST.TRAIN_IMAGE_MD5),
             (FashionMNIST.TRAIN_LABEL_URL, FashionMNIST.TRAIN_LABEL_MD5),
             (FashionMNIST.TEST_IMAGE_URL, FashionMNIST.TEST_IMAGE_MD5),
             (FashionMNIST.TEST_LABEL_URL, FashionMNIST.TEST_LABEL_MD5)]
    paths = [download(url, FashionMNIST.NAME, md5) for url, md5 in files]
    directory = os.path.dirname(paths[0])
    logger.info("Fashion-MNIST downloaded by Paddle into %s", directory)
    return directory


def _read_idx(path: str, header_ints: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    return np.frombuffer(data, dtype=np.uint8, offset=4 * header_ints)


def load_fashion_mnist(split: str, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of ``split`` (``"train"`` or ``"test"``)."""
    if split not in _FILES:
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    directory = find_fashion_mnist(root)
    image_file, label_file = (os.path.join(directory, f) for f in _FILES[split])
    images = _read_idx(image_file, 4).reshape(-1, 28, 28)
    labels = _read_idx(label_file, 2).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    return images, labels


class FashionMNISTDataset(paddle.io.Dataset):
    """Fashion-MNIST as normalised float32 ``[1, 28, 28]`` images and int64 labels.

    ``limit`` keeps the first ``limit`` images (a quick slice for tests and smoke runs).
    """

    def __init__(self, split: str = "train", root: str | None = None, limit: int | None = None) -> None:
        images, labels = load_fashion_mnist(split, root)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]
