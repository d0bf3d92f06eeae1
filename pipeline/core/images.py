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


def check_size(rgb: np.ndarray, limits: SizeLimits, source: str) -> None:
    """:class:`ImageError` naming ``source``, the size and the limit when a decoded ``(H, W, 3)``
    image is too small or too elongated for ``limits``."""
    problem = limits.problem(int(rgb.shape[1]), int(rgb.shape[0]))
    if problem:
        raise ImageError(source, problem)


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
