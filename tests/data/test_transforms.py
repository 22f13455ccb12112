import numpy as np
import pytest
from PIL import Image

from qtrainer.data import IMAGENET_MEAN, IMAGENET_STD, train_transform, val_transform
from qtrainer.data.transforms import ToNormalizedArray


def _rgb(height, width, value=(200, 100, 50)):
    return Image.fromarray(np.tile(np.array(value, np.uint8), (height, width, 1)))


@pytest.mark.parametrize("image_size", [32, 224])
@pytest.mark.parametrize("make", [train_transform, val_transform])
def test_output_is_normalised_float32_chw(make, image_size):
    out = make(image_size)(_rgb(28, 28))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, image_size, image_size)
    # A uniform image stays uniform through crops and resizes (up to Pillow's ±1 rounding in the
    # resampling): each channel is (v/255 - mean) / std.
    std = np.array(IMAGENET_STD)
    expected = (np.array([200, 100, 50]) / 255.0 - np.array(IMAGENET_MEAN)) / std
    np.testing.assert_allclose(out, np.broadcast_to(expected[:, None, None], out.shape), atol=1.01 / (255 * std.min()))


def test_non_square_images_give_square_crops():
    assert train_transform(40)(_rgb(30, 90)).shape == (3, 40, 40)
    assert val_transform(40)(_rgb(30, 90)).shape == (3, 40, 40)


def test_val_takes_the_center_after_resizing_the_short_side():
    # 64×64 image, left half black, right half white. Resize to int(16/0.5)=32 then crop 16: the
    # crop spans columns 8..24 of 32, so its left half is black and its right half white.
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, 32:] = 255
    out = val_transform(16, mean=(0, 0, 0), std=(1, 1, 1), crop_fraction=0.5)(Image.fromarray(pixels))
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out[:, :, :7], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, :, 9:], 1.0, atol=1e-6)


def test_train_crops_and_flips_at_random():
    pixels = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    transform = train_transform(16)
    outputs = [transform(Image.fromarray(pixels)) for _ in range(4)]
    assert any(not np.array_equal(outputs[0], other) for other in outputs[1:])


def test_normalisation_of_known_pixels():
    image = np.array([[[255, 0, 128]]], np.uint8)
    out = ToNormalizedArray(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))(image)
    np.testing.assert_allclose(out[:, 0, 0], [(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (128 / 255) / 2.0], rtol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda: train_transform(0), "image_size=0: use a positive int"),
    (lambda: val_transform(22.5), "image_size=22.5: use a positive int"),
    (lambda: train_transform(32, scale=(0.5, 1.5)), r"scale=\(0.5, 1.5\): use \(low, high\)"),
    (lambda: val_transform(32, crop_fraction=1.2), r"crop_fraction=1.2: use a value in \(0, 1\]"),
    (lambda: ToNormalizedArray(mean=(0.5,), std=(1, 1, 1)), r"give three values each"),
    (lambda: ToNormalizedArray(std=(1, 0, 1)), r"std=\(1, 0, 1\): every value must be > 0"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_rgb_input_is_rejected():
    with pytest.raises(ValueError, match=r"expected an RGB image of shape \[H, W, 3\], got shape \(4, 4\)"):
        ToNormalizedArray()(np.zeros((4, 4), np.uint8))
