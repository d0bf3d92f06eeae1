"""Image decoding: any size of JPEG/PNG works; every bad input is refused with a named reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.core import images


def encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(150, 200), (450, 600), (31, 17)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decodes_any_size_to_rgb_uint8(size, fmt):
    arr = np.full((*size, 3), (200, 100, 50), dtype=np.uint8)
    out = images.decode_rgb(encode(arr, fmt))
    assert out.shape == (*size, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - arr).max() <= 3


def test_greyscale_and_rgba_are_converted_unless_rgb_is_required():
    grey = encode(np.full((20, 30), 77, dtype=np.uint8), "PNG")
    assert images.decode_rgb(grey).shape == (20, 30, 3)
    with pytest.raises(images.ImageError, match="mode is L"):
        images.decode_rgb(grey, "grey.png", require_rgb=True)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, this is text", "not an image"),
        (encode(np.zeros((10, 10, 3), np.uint8), "GIF"), "unsupported format GIF"),
    ],
)
def test_bad_bytes_are_refused_with_the_source_named(data, reason):
    with pytest.raises(images.ImageError) as err:
        images.decode_rgb(data, "upload.jpg")
    assert str(err.value).startswith("upload.jpg: ") and reason in str(err.value)


def test_truncated_jpeg_is_refused():
    data = encode(np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(images.ImageError, match="truncated"):
        images.decode_rgb(data[: len(data) // 2], "cut.jpg")


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encode(np.zeros((4000, 4000), dtype=np.uint8), "PNG")  # compresses to a few KB
    assert len(bomb) < 100_000
    with pytest.raises(images.ImageError, match="decompression bomb"):
        images.decode_rgb(bomb, "bomb.png", max_pixels=10_000_000 // 2)


def test_missing_file(tmp_path):
    with pytest.raises(images.ImageError, match="file not found"):
        images.decode_rgb(tmp_path / "nope.jpg")
