"""Tiny ImageNet-style folders made of generated PNGs, for the data tests."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def class_value(label: int) -> int:
    """The gray level of every pixel of the generated images of class ``label``."""
    return 40 + 50 * label


def write_folder(root, layout: dict[str, dict[str, int]], size: int = 12) -> str:
    """``layout = {split: {class: n_images}}``; each image is uniform at the sorted class's value."""
    for split, classes in layout.items():
        for label, name in enumerate(sorted(classes)):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for index in range(classes[name]):
                pixels = np.full((size, size, 3), class_value(label), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{index:03d}.png"))
    return str(root)
