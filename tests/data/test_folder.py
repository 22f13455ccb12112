import logging
import os
import threading

import numpy as np
import pytest
from PIL import Image
from paddle.io import DataLoader

from image_folders import class_value, write_folder
from qtrainer.data import ImageFolder, UnreadableImageError


def _corrupt(path):
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n not really a png")


def test_classes_are_sorted_folder_names_and_labels_follow_them(tiny_folder):
    train = ImageFolder(tiny_folder, "train")
    assert train.classes == ["cat", "dog", "emu"]
    assert np.bincount(train.targets).tolist() == [4, 3, 5]
    for index in range(len(train)):
        image, label = train[index]
        assert label.dtype == np.int64
        assert np.asarray(image)[0, 0, 0] == class_value(int(label))
        assert os.path.basename(os.path.dirname(train.samples[index][0])) == train.classes[label]


def test_interleaved_order_takes_the_classes_round_robin(tiny_folder):
    by_class = ImageFolder(tiny_folder, "train")
    mixed = ImageFolder(tiny_folder, "train", order="interleaved")
    assert mixed.targets.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 2]  # 4 cats, 3 dogs, 5 emus
    assert sorted(mixed.samples) == sorted(by_class.samples)
    for label in range(3):  # within a class, the folder's (sorted) order
        assert [p for p, y in mixed.samples if y == label] == [p for p, y in by_class.samples if y == label]
    image, label = mixed[1]
    assert label == 1 and np.asarray(image)[0, 0, 0] == class_value(1)
    with pytest.raises(ValueError, match=r"order='random': use one of \('by_class', 'interleaved'\)"):
        ImageFolder(tiny_folder, "train", order="random")


def test_explicit_classes_set_the_label_order(tmp_path):
    root = write_folder(tmp_path, {"train": {"a": 1, "b": 2}, "val": {"a": 1, "b": 2}})
    dataset = ImageFolder(root, "val", classes=["b", "a"])
    assert dataset.class_to_idx == {"b": 0, "a": 1}
    folders = [os.path.basename(os.path.dirname(path)) for path, _ in dataset.samples]
    assert [dataset.classes[label] for label in dataset.targets] == folders
    assert sorted(dataset.targets.tolist()) == [0, 0, 1]


def test_other_files_hidden_folders_and_upper_case_extensions(tmp_path):
    root = write_folder(tmp_path, {"train": {"a": 2}})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "a" / "X.JPEG", format="JPEG")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    os.makedirs(tmp_path / "train" / "a" / "nested")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / "a" / "nested" / "n.png")
    os.makedirs(tmp_path / "train" / ".cache")
    dataset = ImageFolder(root, "train")
    assert dataset.classes == ["a"]
    assert sorted(os.path.basename(p) for p, _ in dataset.samples) == ["000.png", "001.png", "X.JPEG", "n.png"]


def test_grayscale_and_rgba_become_three_channel_rgb(tmp_path):
    os.makedirs(tmp_path / "train" / "a")
    gray = np.arange(36, dtype=np.uint8).reshape(6, 6) * 7
    Image.fromarray(gray).save(tmp_path / "train" / "a" / "gray.png")
    rgba = np.dstack([np.full((6, 6), v, np.uint8) for v in (10, 20, 30, 0)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "train" / "a" / "rgba.png")
    dataset = ImageFolder(str(tmp_path), "train")
    images = {os.path.basename(p): np.asarray(dataset[i][0]) for i, (p, _) in enumerate(dataset.samples)}
    assert images["gray.png"].shape == (6, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(images["gray.png"][..., channel], gray)
    assert images["rgba.png"].shape == (6, 6, 3) and images["rgba.png"][0, 0].tolist() == [10, 20, 30]


def test_transform_is_applied(tiny_folder):
    dataset = ImageFolder(tiny_folder, "val", transform=lambda image: np.asarray(image).shape)
    assert dataset[0][0] == (12, 12, 3)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*<root>/train/<class>/<image>"):
        ImageFolder(str(tmp_path / "nowhere"), "train")


def test_missing_split_names_it_and_the_layout(tmp_path):
    root = write_folder(tmp_path, {"train": {"a": 1}})
    with pytest.raises(FileNotFoundError, match=r"split folder '.*val' not found \(sub-folders of .*: 'train'\)"
                                                r".*<root>/val/<class>/<image>"):
        ImageFolder(root, "val")


def test_split_without_class_folders(tmp_path):
    os.makedirs(tmp_path / "train")
    with pytest.raises(ValueError, match="has no class folders; expected an ImageNet-style folder"):
        ImageFolder(str(tmp_path), "train")


def test_images_directly_in_the_split_are_explained(tmp_path):
    os.makedirs(tmp_path / "val")
    for name in ("1.jpg", "2.jpg"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "val" / name)
    with pytest.raises(ValueError, match="holds 2 image files directly: move them into one sub-folder per class"):
        ImageFolder(str(tmp_path), "val")


def test_empty_class_folder_is_named(tmp_path):
    root = write_folder(tmp_path, {"train": {"a": 2, "b": 1}})
    os.makedirs(tmp_path / "train" / "c")
    (tmp_path / "train" / "c" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty class folder \(no image files\): '.*train/c'"):
        ImageFolder(root, "train")


def test_val_classes_differing_from_train(tmp_path):
    root = write_folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "b": 1, "z": 1}})
    with pytest.raises(ValueError, match=r"class folders of '.*val' differ from the class folders of '.*train': "
                                         r"missing 'c', unexpected 'z'"):
        ImageFolder(root, "val")


def test_unknown_bad_image_policy(tiny_folder):
    with pytest.raises(ValueError, match=r"on_bad_image='ignore': use one of \('error', 'skip'\)"):
        ImageFolder(tiny_folder, "train", on_bad_image="ignore")


def test_corrupt_image_fails_naming_the_file(tiny_folder):
    dataset = ImageFolder(tiny_folder, "train")
    bad = dataset.samples[2][0]
    _corrupt(bad)
    dataset[1]  # the others still read
    with pytest.raises(UnreadableImageError, match=f"cannot read image '{bad}'.*on_bad_image='skip'") as info:
        dataset[2]
    assert info.value.path == bad and dataset.num_skipped == 0


def test_truncated_image_fails(tmp_path):
    root = write_folder(tmp_path, {"train": {"a": 1}}, size=64)
    path = os.path.join(root, "train", "a", "000.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match="000.png"):
        ImageFolder(root, "train")[0]


def test_skip_replaces_counts_and_logs_once(tiny_folder, caplog):
    dataset = ImageFolder(tiny_folder, "train", on_bad_image="skip")
    bad = dataset.samples[2][0]
    _corrupt(bad)
    with caplog.at_level(logging.WARNING, logger="qtrainer.data.folder"):
        image, label = dataset[2]
        again_image, _ = dataset[2]
    next_path, next_label = dataset.samples[3]
    assert label == next_label
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(next_path).convert("RGB")))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(again_image))
    assert dataset.num_skipped == 1 and dataset.skipped_files == [bad]
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warnings) == 1 and bad in warnings[0] and "1 skipped so far" in warnings[0]


def test_skip_wraps_around_and_fails_when_nothing_is_readable(tmp_path):
    root = write_folder(tmp_path, {"train": {"a": 2}})
    dataset = ImageFolder(root, "train", on_bad_image="skip")
    _corrupt(dataset.samples[1][0])
    assert dataset[1][1] == 0 and dataset.num_skipped == 1  # replaced by sample 0
    _corrupt(dataset.samples[0][0])
    with pytest.raises(UnreadableImageError, match="no image in .* can be read"):
        dataset[0]
    assert dataset.num_skipped == 2


def test_skip_count_includes_worker_processes(tiny_folder):
    dataset = ImageFolder(tiny_folder, "train", transform=lambda image: np.asarray(image, np.float32),
                          on_bad_image="skip")
    bad = [dataset.samples[i][0] for i in (0, 7)]
    for path in bad:
        _corrupt(path)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    labels = np.concatenate([batch[1].numpy() for batch in loader])
    assert len(labels) == len(dataset)
    assert dataset.num_skipped == 2 and sorted(dataset.skipped_files) == sorted(bad)


def test_error_in_a_worker_process_names_the_file(tiny_folder, monkeypatch):
    # Paddle re-raises a worker's exception in its reader thread (which prints it on stderr) and
    # then fails the main process with a SystemError: the thread's exception must name the file.
    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    dataset = ImageFolder(tiny_folder, "train", transform=lambda image: np.asarray(image, np.float32))
    bad = dataset.samples[5][0]
    _corrupt(bad)
    with pytest.raises(SystemError, match="data reader raises an exception"):
        for _ in DataLoader(dataset, batch_size=4, num_workers=1):
            pass
    errors = [args.exc_value for args in seen]
    assert any(isinstance(e, UnreadableImageError) and f"cannot read image '{bad}'" in str(e) for e in errors)
