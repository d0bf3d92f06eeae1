"""The one place that finds, decodes and resizes images.

Every part of lesionflow that turns bytes into pixels (the data contract, the EDA statistics,
training's tensor cache, evaluation, the BentoML service, drift monitoring) calls
:func:`decode_rgb`. It accepts JPEG and PNG of any size, refuses everything else with an
:class:`ImageError` that names the source and the reason, and guards against decompression bombs
before a single pixel is decoded. :func:`check_size` refuses an image outside a model's
:class:`~pipeline.core.formats.SizeLimits` (the service, ``lesionflow predict``).
:func:`fit_to_size` is the one resize to a model's input (training's cache and every prediction).
Image files are found by :func:`index_images` (an image folder: image id -> file) and
:func:`list_images` (files a user points at), both for every extension in :data:`IMAGE_EXTENSIONS`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core.errors import LesionflowError
from pipeline.core.formats import FORMATS, IMAGE_EXTENSIONS, SizeLimits

#: Largest image accepted by default, in pixels (about 8000 x 6000).
MAX_PIXELS: int = 48_000_000
#: The working size: a decoded image's longer side is brought down to at most this many pixels
#: (JPEG decoded at a reduced scale where it can be), so that memory and time per image are
#: bounded whatever the upload; every model input, statistic and overlay is far smaller.
WORKING_SIDE: int = 1024

# PIL's own limit warns at MAX_IMAGE_PIXELS and raises at twice that; lesionflow checks the size
# itself (before decoding) so that the message names the source.
Image.MAX_IMAGE_PIXELS = None


class ImageError(LesionflowError, ValueError):
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
    max_side: int | None = WORKING_SIDE,
) -> np.ndarray:
    """Decode ``data`` (bytes or a path) to an ``(H, W, 3)`` uint8 RGB array whose longer side is at
    most ``max_side`` (:data:`WORKING_SIDE`; None: the full size).

    Raises :class:`ImageError` naming ``source`` when the data is empty, not an image, of a format
    outside ``formats``, larger than ``max_pixels`` (checked before decoding), truncated or
    corrupt, or (with ``require_rgb``) stored in a colour mode other than RGB. Other modes
    (greyscale, palette, RGBA, 16-bit greyscale in either byte order) are converted to 8-bit RGB.
    """
    source = source or (str(data) if not isinstance(data, (bytes, bytearray, memoryview)) else "image")
    probe(data, source, formats=formats, max_pixels=max_pixels)
    with _open(data, source) as img:
        if require_rgb and img.mode != "RGB":
            raise ImageError(source, f"colour mode is {img.mode}, expected RGB")
        if max_side is not None and max(img.size) > max_side:
            img.draft("RGB", _scaled(img.size, max_side))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            raise ImageError(source, f"corrupt or truncated image data ({exc})") from None
        return to_rgb8(_working_size(img, max_side))


#: Modes Pillow's box ``reduce`` takes (a fast first step of a large reduction).
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr")


def _working_size(img: Image.Image, max_side: int | None) -> Image.Image:
    """``img`` with its longer side at most ``max_side``, resized in its own mode (1 to 4 bytes a
    pixel) before any conversion to RGB, so a huge upload never exists as a full-size RGB copy."""
    if max_side is None or max(img.size) <= max_side:
        return img
    gap = 2.0 if img.mode in _REDUCIBLE else None
    return img.resize(_scaled(img.size, max_side), Image.Resampling.BILINEAR, reducing_gap=gap)


def _scaled(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled so that the longer side is ``max_side`` (at least 1 pixel each)."""
    w, h = size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def to_rgb8(img: Image.Image) -> np.ndarray:
    """A loaded image as an ``(H, W, 3)`` uint8 RGB array. 16-bit greyscale (``I;16``, ``I;16B``,
    ``I``) is scaled from 0..65535 to 0..255 (Pillow's own conversion clips it: all white)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey8[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


#: JPEG segments that carry metadata about the picture or its taker, not its pixels or colours:
#: APP1 (EXIF, GPS, XMP), APP3-APP12 and APP15 (vendors'), APP13 (IPTC, Photoshop) and COM (comments).
#: APP0 (JFIF), APP2 (ICC colour profile) and APP14 (Adobe colour transform) stay: decoding needs them.
_JPEG_DROP = {0xE1, *range(0xE3, 0xED), 0xED, 0xEF, 0xFE}
#: PNG chunks with text, EXIF or a modification time.
_PNG_DROP = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}


def strip_metadata(data: bytes) -> bytes:
    """``data`` (a JPEG or PNG file) without its embedded metadata (EXIF with GPS position, camera
    serial and times; XMP; IPTC; text chunks), the image data itself untouched byte for byte; data of
    another kind is returned as it is."""
    if data[:2] == b"\xff\xd8":
        return _strip_jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _strip_png(data)
    return data


def _strip_jpeg(data: bytes) -> bytes:
    out, i = [data[:2]], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA or marker == 0xD9:  # start of scan: the rest is image data
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker not in _JPEG_DROP:
            out.append(data[i : i + 2 + length])
        i += 2 + length
    out.append(data[i:])
    return b"".join(out)


def _strip_png(data: bytes) -> bytes:
    out, i = [data[:8]], 8
    while i + 12 <= len(data):
        length = int.from_bytes(data[i : i + 4], "big")
        kind, end = data[i + 4 : i + 8], i + 12 + length
        if kind not in _PNG_DROP:
            out.append(data[i:end])
        i = end
    out.append(data[i:])
    return b"".join(out)


def check_size(rgb: np.ndarray, limits: SizeLimits, source: str) -> None:
    """:class:`ImageError` naming ``source``, the size and the limit when a decoded ``(H, W, 3)``
    image is too small or too elongated for ``limits``."""
    problem = limits.problem(int(rgb.shape[1]), int(rgb.shape[0]))
    if problem:
        raise ImageError(source, problem)


def working_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    """``(height, width)`` of the :func:`working_copy` of a ``height`` x ``width`` image."""
    if max(height, width) <= max_side:
        return height, width
    w, h = _scaled((width, height), max_side)
    return h, w


def working_copy(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """``rgb`` resized (area averaging, never upscaled) so that its longer side is <= max_side: the
    copy the image statistics are computed on (:mod:`pipeline.features.imagestats`)."""
    h, w = rgb.shape[:2]
    nh, nw = working_shape(h, w, max_side)
    if (nh, nw) == (h, w):
        return rgb
    img = Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def resize_rgb(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an ``(H, W, 3)`` uint8 array to ``(height, width, 3)`` with bilinear filtering."""
    if arr.shape[0] == height and arr.shape[1] == width:
        return arr
    img = Image.fromarray(arr).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def fit_to_size(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (height, width, 3).

    A portrait image given to a landscape model (or the reverse) is first turned by 90 degrees, so
    that the lesion is not squashed: dermoscopic images have no canonical orientation.
    """
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    h, w = arr.shape[:2]
    if is_turned((h, w), (height, width)):
        arr = np.ascontiguousarray(np.rot90(arr))
    return resize_rgb(arr, height, width)


def is_turned(image_hw: tuple[int, int], input_hw: tuple[int, int]) -> bool:
    """Whether :func:`fit_to_size` turns an image of ``image_hw`` by 90 degrees for ``input_hw``."""
    (h, w), (ih, iw) = image_hw, input_hw
    return (h > w) != (ih > iw) and h != w and ih != iw


def is_image_file(path: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """A visible file whose extension (any case) is one of ``extensions``."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions


def index_images(folder: Path | str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """``{image id (file stem): file}`` of the image files directly in ``folder`` (empty when the
    folder does not exist). Two files of one stem (``a.jpg``, ``a.png``): the first in
    :data:`IMAGE_EXTENSIONS` order wins."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    rank = {ext: i for i, ext in enumerate(extensions)}
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir(), key=lambda f: (f.stem, rank.get(f.suffix.lower(), len(rank)))):
        if f.stem not in found and is_image_file(f, extensions):
            found[f.stem] = f
    return found


def image_file(index: dict[str, Path], image_id: str, folder: Path | str, where: str = "") -> Path:
    """The file of ``image_id`` in an :func:`index_images` index, or :class:`ImageError` naming
    the folder, the id and (``where``) the row that asked for it."""
    try:
        return index[str(image_id)]
    except KeyError:
        exts = "/".join(IMAGE_EXTENSIONS)
        raise ImageError(
            f"{Path(folder) / str(image_id)}.{{{exts.replace('.', '')}}}",
            f"image file not found{f' ({where})' if where else ''}",
        ) from None


def list_images(
    paths: Sequence[Path | str], extensions: tuple[str, ...] = IMAGE_EXTENSIONS, recursive: bool = True
) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files a user points at: files as given, folders searched (recursively) for
    :data:`IMAGE_EXTENSIONS`, sorted per folder. Returns ``(files, problems)`` with ``problems`` as
    ``(path, reason)`` for a missing path or a folder without images."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            pattern = p.rglob("*") if recursive else p.iterdir()
            found = sorted(f for f in pattern if is_image_file(f, extensions))
            if not found:
                problems.append((str(p), f"folder holds no image files ({', '.join(extensions)})"))
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            problems.append((str(p), "no such file or folder"))
    return files, problems
