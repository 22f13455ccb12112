"""Horizontal bar charts of per-layer numbers, drawn with Pillow (a Paddle dependency), for files and TensorBoard.

``bar_chart(labels, values, title=...)`` returns an ``HxWx3`` uint8 array (TensorBoard's
``add_image(..., dataformats="HWC")``); ``write_bar_chart_png(path, ...)`` writes it as a PNG
atomically. One bar per label, in the order given, its value printed beside it; negative values
extend left of a zero line.
"""
from __future__ import annotations

import io
import math
import os
from typing import Sequence

import numpy as np

__all__ = ["bar_chart", "write_bar_chart_png"]

_ROW = 18  # pixels per bar
_LABEL_CHARS = 40  # longer labels keep their end
_FONT_SIZE = 12  # Pillow's default font: at its own size 10 the "." of "net.0" is barely a pixel
_BAR_WIDTH = 360
_VALUE_WIDTH = 90
_MARGIN = 8
_COLOURS = {"positive": (66, 133, 244), "negative": (219, 68, 55), "text": (32, 32, 32), "axis": (120, 120, 120)}


def _short(label: str) -> str:
    return label if len(label) <= _LABEL_CHARS else "..." + label[-(_LABEL_CHARS - 3):]


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str = "", value_format: str = "{:.3g}") -> np.ndarray:
    """The chart as an ``HxWx3`` uint8 array; non-finite values are drawn as an empty bar marked ``n/a``."""
    from PIL import Image, ImageDraw

    labels = [str(label) for label in labels]
    numbers = [float(v) for v in values]
    if len(labels) != len(numbers):
        raise ValueError(f"bar_chart: {len(labels)} labels but {len(numbers)} values")
    finite = [v for v in numbers if math.isfinite(v)]
    low = min([0.0, *finite])
    high = max([0.0, *finite])
    span = (high - low) or 1.0
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    label_width = math.ceil(max([measure(_short(label), font=font) for label in labels] or [0.0])) + _MARGIN
    width = max(label_width + _BAR_WIDTH + _VALUE_WIDTH + 2 * _MARGIN, math.ceil(measure(title, font=font)) + 2 * _MARGIN)
    top = _MARGIN + (_ROW + 4 if title else 0)
    height = top + _ROW * max(len(labels), 1) + _MARGIN
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((_MARGIN, _MARGIN), title, fill=_COLOURS["text"], font=font)
    x0 = label_width + _MARGIN
    zero = x0 + int(round((0.0 - low) / span * _BAR_WIDTH))
    for row, (label, value) in enumerate(zip(labels, numbers)):
        y = top + row * _ROW
        draw.text((_MARGIN, y + 2), _short(label), fill=_COLOURS["text"], font=font)
        if math.isfinite(value):
            end = x0 + int(round((value - low) / span * _BAR_WIDTH))
            left, right = sorted((zero, end))
            colour = _COLOURS["positive"] if value >= 0 else _COLOURS["negative"]
            draw.rectangle([left, y + 2, max(right, left + 1), y + _ROW - 3], fill=colour)
            text = value_format.format(value)
        else:
            text = "n/a"
        draw.text((x0 + _BAR_WIDTH + _MARGIN, y + 2), text, fill=_COLOURS["text"], font=font)
    draw.line([zero, top, zero, height - _MARGIN], fill=_COLOURS["axis"])
    return np.asarray(image, dtype=np.uint8)


def write_bar_chart_png(path: str | os.PathLike, labels: Sequence[str], values: Sequence[float], title: str = "",
                        value_format: str = "{:.3g}") -> str:
    """Write the chart to ``path`` as a PNG (atomically: a temporary file renamed) and return the path."""
    from PIL import Image

    from qtrainer._io import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(bar_chart(labels, values, title, value_format)).save(buffer, format="PNG")
    atomic_write_bytes(str(path), buffer.getvalue())
    return str(path)
