"""The one place that decodes images.

Every part of lesionflow that turns bytes into pixels (the data contract, the EDA statistics,
training's tensor cache, evaluation, the BentoML service, drift monitoring) calls
:func:`decode_rgb`. It accepts JPEG and PNG of any size, refuses everything else with an
:class:`ImageError` that names the source and the reason, and guards against decompression bombs
before a single pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Formats accepted by default (PIL's names).
FORMATS: tuple[str, ...] = ("JPEG", "PNG")
#: Largest image accepted by default, in pixels (about 8000 x 6000).
MAX_PIXELS: int = 48_000_000

# PIL's own limit warns at MAX_IMAGE_PIXELS and raises at twice that; lesionflow checks the size
# itself (before decoding) so that the message names the source.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An image that cannot be used; ``source`` names the file or request field."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def _open(data: bytes | Path | str, source: str) -> Image.Image:
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) == 0:
                raise ImageError(source, "empty file (0 bytes)")
            return Image.open(io.BytesIO(bytes(data)))
        path = Path(data)
        if not path.exists():
            raise ImageError(source, "file not found")
        if path.stat().st_size == 0:
            raise ImageError(source, "empty file (0 bytes)")
        return Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(source, "not an image (unrecognised file format)") from None
    except OSError as exc:
        raise ImageError(source, f"cannot be read: {exc}") from None


def probe(
    data: bytes | Path | str,
    source: str | None = None,
    *,
    formats: tuple[str, ...] = FORMATS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[str, str, int, int]:
    """(format, mode, width, height) from the header, without decoding the pixels."""
    source = source or (str(data) if not isinstance(data, (bytes, bytearray, memoryview)) else "image")
    with _open(data, source) as img:
        fmt, mode, (w, h) = img.format, img.mode, img.size
    if fmt not in formats:
        raise ImageError(source, f"unsupported format {fmt} (accepted: {', '.join(formats)})")
    if w < 1 or h < 1:
        raise ImageError(source, f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(
            source,
            f"image too large: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(possible decompression bomb)",
        )
    return fmt, mode, w, h


def decode_rgb(
    data: bytes | Path | str,
    source: str | None = None,
    *,
    formats: tuple[str, ...] = FORMATS,
    max_pixels: int = MAX_PIXELS,
    require_rgb: bool = False,
) -> np.ndarray:
    """Decode ``data`` (bytes or a path) to an ``(H, W, 3)`` uint8 RGB array.

    Raises :class:`ImageError` naming ``source`` when the data is empty, not an image, of a format
    outside ``formats``, larger than ``max_pixels`` (checked before decoding), truncated or
    corrupt, or (with ``require_rgb``) stored in a colour mode other than RGB. Other modes
    (greyscale, palette, RGBA) are converted to RGB otherwise.
    """
    source = source or (str(data) if not isinstance(data, (bytes, bytearray, memoryview)) else "image")
    probe(data, source, formats=formats, max_pixels=max_pixels)
    with _open(data, source) as img:
        if require_rgb and img.mode != "RGB":
            raise ImageError(source, f"colour mode is {img.mode}, expected RGB")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            raise ImageError(source, f"corrupt or truncated image data ({exc})") from None
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img, dtype=np.uint8).copy()


def resize_rgb(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 array to ``(height, width, 3)`` with bilinear filtering."""
    if arr.shape[0] == height and arr.shape[1] == width:
        return arr
    img = Image.fromarray(arr).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
