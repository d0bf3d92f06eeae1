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


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written byte by byte (big-endian samples, as the PNG format stores them):
    greyscale for an (H, W) array, RGB for (H, W, 3)."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    colour_type = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16_bit_pngs_decode_to_the_right_8_bit_image():
    """16-bit greyscale used to come out all white (Pillow's conversion clips 0..65535 at 255);
    16-bit RGB keeps its high byte. Both scale 0..65535 onto 0..255."""
    ramp = np.linspace(0, 65535, 80 * 96).reshape(80, 96).astype(np.uint16)
    grey = images.decode_rgb(png16(ramp), "grey16.png")
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert grey.shape == (80, 96, 3) and (grey[..., 0] == grey[..., 2]).all()
    assert np.abs(grey[..., 0].astype(int) - expected).max() <= 1 and grey.min() == 0 and grey.max() == 255
    rgb16 = np.stack([ramp, ramp // 2, 65535 - ramp], axis=-1)
    rgb = images.decode_rgb(png16(rgb16), "rgb16.png")
    assert np.abs(rgb.astype(int) - np.round(rgb16 / 257.0)).max() <= 1
    # both in-memory byte orders of a 16-bit greyscale image, as Pillow holds them
    for mode, dtype in (("I;16", "<u2"), ("I;16B", ">u2")):
        img = Image.frombytes(mode, (96, 80), ramp.astype(dtype).tobytes())
        assert np.abs(images.to_rgb8(img)[..., 1].astype(int) - expected).max() <= 1, mode


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_image_is_brought_to_the_working_size_keeping_its_shape(fmt):
    arr = np.zeros((1800, 2700, 3), dtype=np.uint8)
    arr[:, 1350:] = (200, 100, 50)  # right half coloured: the content keeps its place
    out = images.decode_rgb(encode(arr, fmt))
    assert out.shape == (683, images.WORKING_SIDE, 3)
    assert np.abs(out[:, 600:].astype(int) - (200, 100, 50)).max() <= 4 and out[:, :400].max() <= 4
    assert images.decode_rgb(encode(arr, fmt), max_side=None).shape == arr.shape
