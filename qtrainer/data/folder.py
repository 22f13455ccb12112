"""ImageNet-style image folders: ``<root>/<split>/<class>/<image>`` read as ``(image, label)`` samples.

Class indices are the sorted class folder names of ``<root>/train``; every other split must have
exactly the same class folders, so a label means the same class in every split. Images are
decoded with Pillow (a dependency of paddlepaddle) and converted to RGB: grayscale images get
their single channel repeated three times, an alpha channel is dropped.

Unreadable or corrupt images (``on_bad_image``):

- ``"error"`` (default): reading one raises :class:`UnreadableImageError` naming the file.
- ``"skip"``: the file is logged (a warning, once per file) and counted, and the sample is
  replaced by the next readable image of the split (the next index, wrapping around), so batches
  keep their size. ``num_skipped`` and ``skipped_files`` give the files found so far; the count is
  kept in shared memory, so it includes the files found by loader worker processes.

Files are not decoded up front (that would take hours on ImageNet): a bad file is found when it
is first read.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence

import numpy as np
import paddle
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "BAD_IMAGE_POLICIES", "SAMPLE_ORDERS", "LAYOUT", "ImageFolder", "UnreadableImageError",
           "list_classes", "load_rgb"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")
BAD_IMAGE_POLICIES = ("error", "skip")
#: ``"by_class"``: class by class, files sorted (the folder's order); ``"interleaved"``: the same files
#: taken round-robin across the classes, so that any first N samples hold every class in proportion.
SAMPLE_ORDERS = ("by_class", "interleaved")
LAYOUT = ("expected an ImageNet-style folder: <root>/train/<class>/<image> and <root>/val/<class>/<image>, "
          "one sub-folder per class, the same class folders in every split, images ending in "
          + " ".join(IMAGE_EXTENSIONS))
# What Pillow raises for a file it cannot decode (UnidentifiedImageError and truncation are OSErrors).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; the message and ``path`` name it.

    ``path`` is optional so the error can be rebuilt from its message alone, which is what
    Paddle's DataLoader does with an exception raised in a worker process.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully and return it as an RGB PIL image (grayscale → 3 equal channels)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def list_classes(split_dir: str) -> list[str]:
    """The sorted names of the class folders (non-hidden sub-directories) of ``split_dir``."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not _is_hidden(e.name))


def _list_images(class_dir: str) -> list[str]:
    """Image files under ``class_dir`` (sub-folders included), in a deterministic order."""
    found = []
    for directory, subdirs, files in os.walk(class_dir, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not _is_hidden(d))
        found.extend(os.path.join(directory, f) for f in sorted(files) if _is_image(f))
    return found


def _short_list(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _interleave_classes(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``samples`` reordered round-robin by label: the first of each class, then the second, ..."""
    by_label: dict[int, list[tuple[str, int]]] = {}
    for sample in samples:
        by_label.setdefault(sample[1], []).append(sample)
    columns = [by_label[label] for label in sorted(by_label)]
    return [column[k] for k in range(max(map(len, columns), default=0)) for column in columns if k < len(column)]


class ImageFolder(paddle.io.Dataset):
    """The ``split`` of an ImageNet-style folder as ``(transform(image), int64 label)`` samples.

    Args:
        root: the folder holding ``train/`` and ``val/`` (see ``LAYOUT``).
        split: the sub-folder to read (``"train"``, ``"val"``, ...).
        transform: applied to the RGB PIL image (``None`` returns the PIL image).
        classes: the class folder names, in label order. Default: the sorted class folders of
            ``<root>/train`` (of ``split`` itself if there is no ``train``). The split must hold
            exactly these folders.
        on_bad_image: ``"error"`` or ``"skip"`` (see the module docstring).
        order: ``"by_class"`` (default) or ``"interleaved"`` (``SAMPLE_ORDERS``): a fixed order either
            way; interleaved makes every prefix a fair sample (a validation subset such as
            ``limit_val_batches`` or the accuracy check's first batches sees every class).

    Raises ``FileNotFoundError`` for a missing root or split folder and ``ValueError`` for a split
    without class folders, an empty class folder, or class folders that differ from ``classes``.
    """

    def __init__(self, root: str, split: str = "train", transform: Callable | None = None,
                 classes: Sequence[str] | None = None, on_bad_image: str = "error", order: str = "by_class") -> None:
        super().__init__()
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image={on_bad_image!r}: use one of {BAD_IMAGE_POLICIES}")
        if order not in SAMPLE_ORDERS:
            raise ValueError(f"order={order!r}: use one of {SAMPLE_ORDERS}")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist; {LAYOUT}")
        self.root, self.split = root, split
        self.split_dir = os.path.join(root, split)
        if not os.path.isdir(self.split_dir):
            present = list_classes(root)
            raise FileNotFoundError(
                f"split folder {self.split_dir!r} not found (sub-folders of {root!r}: "
                f"{_short_list(present) if present else 'none'}); {LAYOUT}")
        self.classes = self._check_classes(classes)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples = self._scan()
        if order == "interleaved":
            self.samples = _interleave_classes(self.samples)
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)
        self.transform = transform
        self.on_bad_image = on_bad_image
        # One shared byte per sample, set when the file is found unreadable ("skip" only).
        self._bad = multiprocessing.RawArray("b", len(self.samples)) if on_bad_image == "skip" else None

    def _check_classes(self, classes: Sequence[str] | None) -> list[str]:
        found = list_classes(self.split_dir)
        if not found:
            loose = [f for f in os.listdir(self.split_dir) if _is_image(f)]
            detail = (f"; it holds {len(loose)} image files directly: move them into one sub-folder per class"
                      if loose else "")
            raise ValueError(f"{self.split_dir!r} has no class folders{detail}; {LAYOUT}")
        source = "the classes argument"
        if classes is None:
            train_dir = os.path.join(self.root, "train")
            if self.split == "train" or not os.path.isdir(train_dir) or not list_classes(train_dir):
                return found
            classes, source = list_classes(train_dir), f"the class folders of {train_dir!r}"
        classes = list(classes)
        if found != sorted(classes) or len(set(classes)) != len(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise ValueError(
                f"the class folders of {self.split_dir!r} differ from {source}: "
                f"missing {_short_list(missing) if missing else 'none'}, "
                f"unexpected {_short_list(extra) if extra else 'none'}"
                + ("" if missing or extra else f", or {source} repeats a name") + f"; {LAYOUT}")
        return classes

    def _scan(self) -> list[tuple[str, int]]:
        samples, empty = [], []
        for label, name in enumerate(self.classes):
            class_dir = os.path.join(self.split_dir, name)
            files = _list_images(class_dir)
            if not files:
                empty.append(class_dir)
            samples.extend((path, label) for path in files)
        if empty:
            raise ValueError(f"empty class folder (no image files): {_short_list(empty)}; {LAYOUT}")
        logger.debug("%s: %d images in %d classes", self.split_dir, len(samples), len(self.classes))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, label = self._read(int(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, np.int64(label)

    def _read(self, index: int) -> tuple[Image.Image, int]:
        if self._bad is None:
            path, label = self.samples[index]
            try:
                return load_rgb(path), label
            except _DECODE_ERRORS as error:
                raise UnreadableImageError(
                    f"cannot read image {path!r} ({type(error).__name__}: {error}); fix or remove it, "
                    "or pass on_bad_image='skip' to skip unreadable images and count them", path) from error
        count = len(self.samples)
        for step in range(count):
            candidate = (index + step) % count
            if self._bad[candidate]:
                continue
            path, label = self.samples[candidate]
            try:
                return load_rgb(path), label
            except _DECODE_ERRORS as error:
                self._bad[candidate] = 1
                logger.warning("skipping unreadable image %s (%s: %s); %d skipped so far in %s",
                               path, type(error).__name__, error, self.num_skipped, self.split_dir)
        raise UnreadableImageError(f"no image in {self.split_dir!r} can be read ({count} files, all skipped "
                                   "as unreadable)", self.split_dir)

    @property
    def num_skipped(self) -> int:
        """How many unreadable files were found and skipped so far (0 with ``on_bad_image='error'``)."""
        return 0 if self._bad is None else int(np.frombuffer(self._bad, dtype=np.int8).sum())

    @property
    def skipped_files(self) -> list[str]:
        """The unreadable files found and skipped so far."""
        if self._bad is None:
            return []
        flags = np.frombuffer(self._bad, dtype=np.int8)
        return [self.samples[i][0] for i in np.flatnonzero(flags)]
