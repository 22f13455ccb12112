import gzip
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from qtrainer.data import ImageFolder, default_cache_dir, load_fashion_mnist, prepare_fashion_mnist_folder
from qtrainer.data import fashion_mnist, fashion_mnist_folder
from qtrainer.data.fashion_mnist_folder import CLASS_FOLDERS, MARKER, png_bytes


def _write_idx(directory, split_files, images, labels):
    image_file, label_file = split_files
    count = len(labels)
    with gzip.open(os.path.join(directory, image_file), "wb") as handle:
        handle.write(np.array([2051, count, 28, 28], ">u4").tobytes() + images.astype(np.uint8).tobytes())
    with gzip.open(os.path.join(directory, label_file), "wb") as handle:
        handle.write(np.array([2049, count], ">u4").tobytes() + labels.astype(np.uint8).tobytes())


@pytest.fixture
def small_source(tmp_path):
    """Fake ``*-ubyte.gz`` files: 3 images per class in train, 2 in test, random pixels."""
    directory = tmp_path / "source"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("test", 2)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        images = rng.integers(0, 256, (len(labels), 28, 28))
        _write_idx(directory, fashion_mnist._FILES[split], images, labels)
    return str(directory)


def _pngs(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".png"))


def _check_against_source(folder, source):
    """Every PNG decodes to the source image at its index, in the folder of its source label."""
    for split, source_split in (("train", "train"), ("val", "test")):
        images, labels = load_fashion_mnist(source_split, source)
        for path in _pngs(os.path.join(folder, split)):
            index = int(os.path.splitext(os.path.basename(path))[0])
            decoded = np.asarray(Image.open(path))
            assert decoded.dtype == np.uint8 and decoded.shape == (28, 28)
            np.testing.assert_array_equal(decoded, images[index])
            assert os.path.basename(os.path.dirname(path)) == CLASS_FOLDERS[labels[index]]


def test_real_data_first_five_per_class(fashion_mnist_dir, tmp_path):
    folder = prepare_fashion_mnist_folder(cache_dir=str(tmp_path), root=fashion_mnist_dir, limit_per_class=5)
    assert folder == os.path.join(str(tmp_path), "first-5-per-class")
    for split, source_split in (("train", "train"), ("val", "test")):
        assert sorted(os.listdir(os.path.join(folder, split))) == sorted(CLASS_FOLDERS)
        _, labels = load_fashion_mnist(source_split, fashion_mnist_dir)
        expected = sorted(int(i) for c in range(10) for i in np.flatnonzero(labels == c)[:5])
        names = [os.path.basename(p) for p in _pngs(os.path.join(folder, split))]
        assert sorted(int(n[:-4]) for n in names) == expected  # the first five of each class
    _check_against_source(folder, fashion_mnist_dir)
    marker = json.load(open(os.path.join(folder, MARKER)))
    assert marker["counts"]["val"] == {name: 5 for name in CLASS_FOLDERS}
    # the folder loader reads the original Fashion-MNIST labels back
    val = ImageFolder(folder, "val")
    _, labels = load_fashion_mnist("test", fashion_mnist_dir)
    assert [int(labels[int(os.path.basename(p)[:-4])]) for p, _ in val.samples] == val.targets.tolist()


def test_second_call_reuses_the_folder(small_source, tmp_path, monkeypatch):
    folder = prepare_fashion_mnist_folder(cache_dir=str(tmp_path / "cache"), root=small_source)
    before = {p: os.stat(p).st_mtime_ns for p in _pngs(folder)}
    assert len(before) == 50

    def must_not_read(*args, **kwargs):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(fashion_mnist_folder.fashion_mnist, "load_fashion_mnist", must_not_read)
    monkeypatch.setattr(fashion_mnist_folder.fashion_mnist, "find_fashion_mnist", must_not_read)
    assert prepare_fashion_mnist_folder(cache_dir=str(tmp_path / "cache"), root=small_source) == folder
    assert {p: os.stat(p).st_mtime_ns for p in _pngs(folder)} == before


def test_process_pool_writes_the_same_folder(small_source, tmp_path, monkeypatch):
    pools = []

    class RecordedPool(fashion_mnist_folder.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fashion_mnist_folder, "ProcessPoolExecutor", RecordedPool)
    folder = prepare_fashion_mnist_folder(cache_dir=str(tmp_path / "cache"), root=small_source, processes=2)
    assert pools == [(2,)]
    assert len(_pngs(folder)) == 50
    _check_against_source(folder, small_source)
    assert os.listdir(tmp_path / "cache") == ["full"]  # no temporary folder left


def test_half_written_folder_is_rebuilt(small_source, tmp_path):
    folder = prepare_fashion_mnist_folder(cache_dir=str(tmp_path), root=small_source, limit_per_class=1)
    missing = _pngs(folder)[0]
    os.remove(missing)
    assert prepare_fashion_mnist_folder(cache_dir=str(tmp_path), root=small_source, limit_per_class=1) == folder
    assert os.path.exists(missing) and len(_pngs(folder)) == 20
    os.remove(os.path.join(folder, MARKER))
    prepare_fashion_mnist_folder(cache_dir=str(tmp_path), root=small_source, limit_per_class=1)
    assert os.path.exists(os.path.join(folder, MARKER))


def test_a_failed_build_leaves_nothing(small_source, tmp_path, monkeypatch):
    def fail_after_some(paths, images):
        Image.fromarray(images[0]).save(paths[0])
        raise OSError("disk full")

    monkeypatch.setattr(fashion_mnist_folder, "_write_pngs", fail_after_some)
    with pytest.raises(OSError, match="disk full"):
        prepare_fashion_mnist_folder(cache_dir=str(tmp_path / "cache"), root=small_source, processes=1)
    assert os.listdir(tmp_path / "cache") == []


def _nothing_installed(monkeypatch, tmp_path):
    monkeypatch.setenv("QTRAINER_FASHION_MNIST", str(tmp_path / "empty"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "empty"))


def test_paddle_downloader_is_the_fallback(small_source, tmp_path, monkeypatch):
    _nothing_installed(monkeypatch, tmp_path)
    monkeypatch.setattr(fashion_mnist, "download_fashion_mnist", lambda: small_source)
    folder = prepare_fashion_mnist_folder(cache_dir=str(tmp_path), limit_per_class=2)
    assert len(_pngs(folder)) == 40
    _check_against_source(folder, small_source)


def test_nothing_installed_and_offline_says_what_to_install(tmp_path, monkeypatch):
    _nothing_installed(monkeypatch, tmp_path)

    def offline():
        raise RuntimeError("Cannot download https://example/t10k within retry limit 3")

    monkeypatch.setattr(fashion_mnist, "download_fashion_mnist", offline)
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*"
                                                r"Paddle's downloader failed too \(RuntimeError: Cannot download"):
        prepare_fashion_mnist_folder(cache_dir=str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache")


def test_an_explicit_root_is_not_replaced_by_a_download(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "download_fashion_mnist", lambda: pytest.fail("downloaded"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist_folder(cache_dir=str(tmp_path / "cache"), root=str(tmp_path))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QTRAINER_CACHE", str(tmp_path / "qc"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "qc"), "fashion-mnist")
    monkeypatch.delenv("QTRAINER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "qtrainer", "fashion-mnist")


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit(limit, tmp_path):
    with pytest.raises(ValueError, match=f"limit_per_class={limit!r}: use a positive int"):
        prepare_fashion_mnist_folder(cache_dir=str(tmp_path), limit_per_class=limit)


@pytest.mark.parametrize("shape", [(28, 28), (5, 7), (1, 1)])
def test_png_bytes_decode_exactly_with_pillow(shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    decoded = Image.open(io.BytesIO(png_bytes(image)))
    assert decoded.format == "PNG" and decoded.mode == "L"
    np.testing.assert_array_equal(np.asarray(decoded), image)


def test_png_bytes_rejects_other_arrays():
    with pytest.raises(ValueError, match=r"expected a 2-D uint8 image, got float32 of shape \(2, 2\)"):
        png_bytes(np.zeros((2, 2), np.float32))


def test_a_build_finished_first_by_another_process_wins(small_source, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    real_build = fashion_mnist_folder._build

    def build_while_another_process_finishes(folder, *args):
        counts = real_build(folder, *args)
        monkeypatch.setattr(fashion_mnist_folder, "_build", real_build)
        prepare_fashion_mnist_folder(cache_dir=cache, root=small_source)  # the other process
        return counts

    monkeypatch.setattr(fashion_mnist_folder, "_build", build_while_another_process_finishes)
    folder = prepare_fashion_mnist_folder(cache_dir=cache, root=small_source)
    assert os.listdir(cache) == ["full"] and len(_pngs(folder)) == 50
    _check_against_source(folder, small_source)


def test_stale_temporary_folders_are_removed(small_source, tmp_path):
    cache = tmp_path / "cache"
    old, recent = cache / ".full.tmp-old", cache / ".full.tmp-recent"
    old.mkdir(parents=True)
    recent.mkdir()
    two_hours_ago = os.path.getmtime(old) - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    prepare_fashion_mnist_folder(cache_dir=str(cache), root=small_source)
    assert sorted(os.listdir(cache)) == [".full.tmp-recent", "full"]  # a recent one may be a live build
