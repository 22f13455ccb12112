"""Fashion-MNIST written once as an ImageNet-style folder of PNGs, the default data of the recipes.

The default run then goes through exactly the folder loader an ImageNet run uses::

    <cache_dir>/full/train/<class>/<index>.png        60,000 images (the official train split)
    <cache_dir>/full/val/<class>/<index>.png          10,000 images (the official test split)
    <cache_dir>/first-<k>-per-class/...                with limit_per_class=k

``<index>`` is the image's position in its source split. The class folders are ``CLASSES``
prefixed with their label (``0-t-shirt`` ... ``9-ankle-boot``), so the folder loader's sorted
class order gives every image its original Fashion-MNIST label. The PNGs stay 28×28 grayscale;
the loader's transforms resize them and repeat the channel to make RGB.

The folder is built in a temporary sibling directory and renamed into place only when complete,
with a marker file recording the counts; a folder without a valid marker (or with missing files)
is never used, so an interrupted run cannot leave a half-written data set behind.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import struct
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from qtrainer._checks import check_positive_int
from qtrainer.data import fashion_mnist
from qtrainer.data.fashion_mnist import CLASSES

__all__ = ["CLASS_FOLDERS", "MARKER", "default_cache_dir", "prepare_fashion_mnist_folder"]

logger = logging.getLogger(__name__)

MARKER = "qtrainer-complete.json"
_FORMAT = 1
_SPLITS = {"train": "train", "val": "test"}  # folder split -> Fashion-MNIST split
_CHUNK = 2000  # images per process-pool task
_STALE_SECONDS = 3600  # temporary build folders older than this are from interrupted runs
CLASS_FOLDERS = tuple(f"{label}-{name}" for label, name in enumerate(CLASSES))


def default_cache_dir() -> str:
    """``$QTRAINER_CACHE/fashion-mnist``, else ``$XDG_CACHE_HOME/qtrainer/fashion-mnist`` or ``~/.cache/...``."""
    base = os.environ.get("QTRAINER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qtrainer")
    return os.path.join(base, "fashion-mnist")


def _source_dir(root: str | None) -> str:
    """The directory of the ``*-ubyte.gz`` files; Paddle's downloader when none is installed."""
    if root is not None:
        return fashion_mnist.find_fashion_mnist(root)
    try:
        return fashion_mnist.find_fashion_mnist()
    except FileNotFoundError as missing:
        logger.info("Fashion-MNIST not installed; trying Paddle's downloader")
        try:
            return fashion_mnist.download_fashion_mnist()
        except Exception as error:  # any network or checksum failure: report it with what to install
            raise FileNotFoundError(
                f"{missing} Paddle's downloader failed too ({type(error).__name__}: {error}).") from error


def _read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _is_complete(folder: str, limit_per_class: int | None) -> bool:
    """The marker is there, matches the request, and every class folder holds its recorded count."""
    marker = _read_marker(folder)
    if not marker or marker.get("format") != _FORMAT or marker.get("limit_per_class") != limit_per_class:
        return False
    try:
        return all(len(os.listdir(os.path.join(folder, split, name))) == count
                   for split, counts in marker["counts"].items() for name, count in counts.items())
    except (OSError, KeyError, AttributeError):
        return False


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(image: np.ndarray) -> bytes:
    """A 2-D uint8 array as an 8-bit grayscale PNG file (PNG spec: IHDR, one IDAT, IEND).

    Written directly with zlib: Pillow's ``save`` costs ≈0.3 ms per 28×28 image in Python-side
    overhead, this ≈0.04 ms, which is most of the time of writing 70,000 files.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} of shape {image.shape}")
    height, width = image.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # each row starts with filter type 0 (none)
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, grayscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _png_chunk(b"IEND", b""))


def _write_pngs(paths: list[str], images: np.ndarray) -> int:
    for path, image in zip(paths, images):
        with open(path, "wb") as handle:
            handle.write(png_bytes(image))
    return len(paths)


def _select(labels: np.ndarray, limit_per_class: int | None) -> np.ndarray:
    if limit_per_class is None:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(CLASSES))]))


def _build(folder: str, source: str, limit_per_class: int | None, processes: int) -> dict:
    """Write every selected image into ``folder``; the per-split, per-class counts."""
    counts: dict[str, dict[str, int]] = {}
    tasks: list[tuple[list[str], np.ndarray]] = []
    for split, source_split in _SPLITS.items():
        images, labels = fashion_mnist.load_fashion_mnist(source_split, source)
        chosen = _select(labels, limit_per_class)
        for name in CLASS_FOLDERS:
            os.makedirs(os.path.join(folder, split, name))
        paths = [os.path.join(folder, split, CLASS_FOLDERS[labels[i]], f"{i:05d}.png") for i in chosen]
        for start in range(0, len(chosen), _CHUNK):
            tasks.append((paths[start:start + _CHUNK], images[chosen[start:start + _CHUNK]]))
        counts[split] = {name: int(np.sum(labels[chosen] == c)) for c, name in enumerate(CLASS_FOLDERS)}
    if processes > 1 and len(tasks) > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: the children need only numpy and zlib, and start without re-importing Paddle.
        with ProcessPoolExecutor(min(processes, len(tasks)), mp_context=multiprocessing.get_context("fork")) as pool:
            written = sum(pool.map(_write_pngs, *zip(*tasks)))
    else:
        written = sum(_write_pngs(paths, images) for paths, images in tasks)
    expected = sum(sum(c.values()) for c in counts.values())
    if written != expected:
        raise RuntimeError(f"wrote {written} PNGs into {folder!r}, expected {expected}")
    return counts


def _remove_stale_builds(cache_dir: str, name: str) -> None:
    prefix = f".{name}.tmp-"
    for entry in os.listdir(cache_dir):
        path = os.path.join(cache_dir, entry)
        try:
            stale = entry.startswith(prefix) and time.time() - os.path.getmtime(path) > _STALE_SECONDS
        except OSError:  # removed meanwhile by another process
            continue
        if stale:
            logger.info("removing %s, left by an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)


def prepare_fashion_mnist_folder(cache_dir: str | None = None, root: str | None = None,
                                 limit_per_class: int | None = None, processes: int | None = None) -> str:
    """Materialise Fashion-MNIST as an ImageNet-style folder once; its path (holding train/ and val/).

    Args:
        cache_dir: where the folders live (default: ``default_cache_dir()``).
        root: the directory of the four ``*-ubyte.gz`` files; by default the installed ones
            (``find_fashion_mnist``), else Paddle's downloader when online. A clear
            ``FileNotFoundError`` says what to install when neither works.
        limit_per_class: keep only the first ``k`` images of each class in each split (a quick
            slice for tests and smoke runs), in its own folder.
        processes: PNG-writing processes (default: the CPU count, at most 4).

    A complete folder from an earlier call is reused as is (nothing is read or written).
    """
    check_positive_int("limit_per_class", limit_per_class, allow_none=True, hint=" (None: every image)")
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    name = "full" if limit_per_class is None else f"first-{limit_per_class}-per-class"
    target = os.path.join(cache_dir, name)
    if _is_complete(target, limit_per_class):
        logger.debug("reusing %s", target)
        return target

    source = _source_dir(root)
    os.makedirs(cache_dir, exist_ok=True)
    _remove_stale_builds(cache_dir, name)
    processes = processes if processes is not None else min(4, os.cpu_count() or 1)
    logger.info("writing Fashion-MNIST from %s as PNG folders into %s (once)", source, target)
    started = time.perf_counter()
    building = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir)
    try:
        os.chmod(building, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        counts = _build(building, source, limit_per_class, processes)
        marker = {"format": _FORMAT, "source": source, "limit_per_class": limit_per_class,
                  "source_splits": _SPLITS, "counts": counts}
        with open(os.path.join(building, MARKER), "w", encoding="utf-8") as handle:
            json.dump(marker, handle, indent=1)
        if os.path.exists(target):
            if _is_complete(target, limit_per_class):  # another process finished first
                return target
            logger.warning("removing the incomplete folder %s", target)
            shutil.rmtree(target)
        try:
            os.rename(building, target)
        except OSError:
            if not _is_complete(target, limit_per_class):  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already when the rename succeeded
    total = sum(sum(c.values()) for c in counts.values())
    logger.info("wrote %d PNGs into %s in %.1f s", total, target, time.perf_counter() - started)
    return target
