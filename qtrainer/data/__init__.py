"""Data helpers: ImageNet-style folder loaders and the default real data set (Fashion-MNIST).

``make_loaders(root, image_size, batch_size, ...)`` reads ``root/train/<class>/*`` and
``root/val/<class>/*``; ``prepare_fashion_mnist_folder()`` writes Fashion-MNIST once in that
layout, so the default data goes through the same loader as ImageNet.
"""
from qtrainer.data.fashion_mnist import (
    CLASSES,
    FashionMNISTDataset,
    download_fashion_mnist,
    find_fashion_mnist,
    load_fashion_mnist,
)
from qtrainer.data.fashion_mnist_folder import default_cache_dir, prepare_fashion_mnist_folder
from qtrainer.data.folder import IMAGE_EXTENSIONS, LAYOUT, ImageFolder, UnreadableImageError
from qtrainer.data.loaders import make_loaders
from qtrainer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform, val_transform

__all__ = [
    "CLASSES",
    "FashionMNISTDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "LAYOUT",
    "UnreadableImageError",
    "default_cache_dir",
    "download_fashion_mnist",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "make_loaders",
    "prepare_fashion_mnist_folder",
    "train_transform",
    "val_transform",
]
