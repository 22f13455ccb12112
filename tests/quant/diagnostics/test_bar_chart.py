"""Tests of qtrainer/quant/diagnostics/bar_chart.py: the picture's shape and what its bars show."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qtrainer.quant.diagnostics import bar_chart as module
from qtrainer.quant.diagnostics.bar_chart import bar_chart, write_bar_chart_png

POSITIVE = module._COLOURS["positive"]
NEGATIVE = module._COLOURS["negative"]


def _row_colours(image, row, title=True):
    """The set of colours in the bar area of bar ``row`` (``row`` counts from 0)."""
    top = module._MARGIN + (module._ROW + 4 if title else 0) + row * module._ROW
    band = image[top + 4:top + module._ROW - 4]
    return {tuple(int(c) for c in pixel) for pixel in band.reshape(-1, 3)}


def _bar_columns(image, row, colour):
    top = module._MARGIN + (module._ROW + 4) + row * module._ROW
    line = image[top + module._ROW // 2]
    return np.flatnonzero(np.all(line == np.asarray(colour, dtype=np.uint8), axis=1))


def test_shape_dtype_and_one_row_per_label():
    one = bar_chart(["a"], [1.0], title="t")
    three = bar_chart(["a", "b", "c"], [1.0, 2.0, 3.0], title="t")
    assert one.dtype == np.uint8 and one.ndim == 3 and one.shape[2] == 3
    assert three.shape[1] == one.shape[1] and three.shape[0] - one.shape[0] == 2 * module._ROW
    assert len(np.unique(three.reshape(-1, 3), axis=0)) > 2  # not a blank picture


def test_bar_lengths_follow_the_values():
    image = bar_chart(["small", "large"], [1.0, 4.0], title="t")
    small, large = _bar_columns(image, 0, POSITIVE), _bar_columns(image, 1, POSITIVE)
    assert small.size and large.size and small[0] == large[0]  # both start at the zero line
    assert large.size == pytest.approx(4 * small.size, abs=2)


def test_a_negative_value_extends_left_of_zero_in_its_own_colour():
    image = bar_chart(["up", "down"], [2.0, -1.0], title="t")
    up, down = _bar_columns(image, 0, POSITIVE), _bar_columns(image, 1, NEGATIVE)
    assert up.size and down.size
    assert down.max() <= up.min() + 1  # the negative bar ends where the positive one starts
    assert NEGATIVE not in _row_colours(image, 0) and POSITIVE not in _row_colours(image, 1)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_value_draws_no_bar(value):
    image = bar_chart(["finite", "missing"], [1.0, value], title="t")
    assert POSITIVE in _row_colours(image, 0)
    colours = _row_colours(image, 1)
    assert POSITIVE not in colours and NEGATIVE not in colours


def test_no_title_moves_the_bars_up():
    image = bar_chart(["a"], [1.0])
    assert POSITIVE in _row_colours(image, 0, title=False)
    assert image.shape[0] == bar_chart(["a"], [1.0], title="t").shape[0] - (module._ROW + 4)


def test_the_label_column_fits_the_longest_label():
    short, long = bar_chart(["a"], [1.0]), bar_chart(["a" * 30], [1.0])
    assert long.shape[1] > short.shape[1]
    assert bar_chart(["b" * 100], [1.0]).shape[1] == bar_chart(["..." + "b" * 37], [1.0]).shape[1]  # its end kept
    wide = bar_chart(["a"], [1.0], title="t" * 200)
    assert wide.shape[1] > short.shape[1] and (wide[:module._MARGIN + module._ROW, -3 * module._MARGIN:] < 200).any()


def test_label_and_value_counts_must_match():
    with pytest.raises(ValueError, match="2 labels but 3 values"):
        bar_chart(["a", "b"], [1.0, 2.0, 3.0])


def test_png_file_holds_the_same_picture(tmp_path):
    path = write_bar_chart_png(tmp_path / "chart.png", ["a", "b"], [1.0, -2.0], title="t")
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), bar_chart(["a", "b"], [1.0, -2.0], "t"))
