"""Data helpers: the default real data set (Fashion-MNIST) and ImageNet-style folders."""
from qtrainer.data.fashion_mnist import FashionMNISTDataset, find_fashion_mnist, load_fashion_mnist

__all__ = ["FashionMNISTDataset", "find_fashion_mnist", "load_fashion_mnist"]
