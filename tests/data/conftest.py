"""Fixtures of the data tests; the folder-writing helpers live in image_folders.py."""
import pytest

from image_folders import write_folder


@pytest.fixture
def tiny_folder(tmp_path):
    """3 classes: train 4 + 3 + 5 images, val 2 each."""
    return write_folder(tmp_path / "data", {"train": {"cat": 4, "dog": 3, "emu": 5},
                                            "val": {"cat": 2, "dog": 2, "emu": 2}})
