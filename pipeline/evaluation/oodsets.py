"""Images that are not dermoscopic lesions, to measure the out-of-distribution detector with,
without downloading anything:

* ``photo``: the sample photographs that ship inside installed packages (scikit-image's bundled
  ``skimage/data`` images, never its downloadable ones; scikit-learn's ``china.jpg`` and
  ``flower.jpg``): people, animals, objects, scenes, text, microscopy, a retina; each whole and as
  four corner crops of 60 %;
* ``synthetic``: blank frames (black, white, grey, skin-coloured), noise (uniform, Gaussian,
  salt-and-pepper, smooth), gradients, checkerboards and screenshot-like renderings (text lines
  and window boxes), seeded.

Every image is an ``(H, W, 3)`` uint8 array at least 64x64 (the smallest the service accepts), so
the detector, not the size check, has to catch it. Which images and why: ``docs/trust.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core import images

#: Grayscale or tiny bundled files that are not photographs of anything (or below 64x64).
_SKIP = {"lbpcascade_frontalface_opencv.xml", "lfw_subset.npy", "motorcycle_disp.npz", "multipage.tif"}
_PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class OodImage:
    """One out-of-distribution image: its group (``photo`` or ``synthetic``), name and pixels."""

    group: str
    name: str
    rgb: np.ndarray


def _bundled_files() -> list[Path]:
    files: list[Path] = []
    try:
        root = Path(str(resources.files("skimage") / "data"))
        files += sorted(f for f in root.iterdir() if f.suffix.lower() in _PHOTO_SUFFIXES and f.name not in _SKIP)
    except ModuleNotFoundError:
        pass
    try:
        root = Path(str(resources.files("sklearn.datasets") / "images"))
        files += sorted(root.glob("*.jpg"))
    except ModuleNotFoundError:
        pass
    return files


def _crops(rgb: np.ndarray, share: float = 0.6) -> list[np.ndarray]:
    h, w = rgb.shape[:2]
    ch, cw = int(h * share), int(w * share)
    return [rgb[y : y + ch, x : x + cw] for y in (0, h - ch) for x in (0, w - cw)]


def photographs(min_side: int = 64) -> list[OodImage]:
    """The bundled sample photographs, whole and as four corner crops (those at least ``min_side``)."""
    out: list[OodImage] = []
    for f in _bundled_files():
        try:
            rgb = images.decode_rgb(f, str(f))
        except images.ImageError:
            continue  # a bundled file PIL cannot read as an image
        for i, view in enumerate([rgb, *_crops(rgb)]):
            if min(view.shape[:2]) >= min_side:
                out.append(OodImage("photo", f"{f.stem}{'' if i == 0 else f'_crop{i}'}", np.ascontiguousarray(view)))
    return out


def _screenshot(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(225, 256, 3)))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, w, 18], fill=tuple(int(v) for v in rng.integers(40, 120, 3)))
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(24, h // 2))
        draw.rectangle([x0, y0, x0 + int(rng.integers(40, w // 2)), y0 + int(rng.integers(20, h // 3))], outline=0)
    for y in range(26, h - 10, 14):
        draw.text((8, y), "".join(rng.choice(list("lesionflow report 0123456789 "), size=40)), fill=(20, 20, 20))
    return np.asarray(img, dtype=np.uint8)


def synthetic(seed: int = 0, h: int = 150, w: int = 200) -> list[OodImage]:
    """Seeded blanks, noise, gradients, checkerboards and screenshot-like images (``h`` x ``w``)."""
    rng = np.random.default_rng(seed)
    out: list[OodImage] = []

    def add(name: str, arr: np.ndarray) -> None:
        out.append(OodImage("synthetic", name, np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))))

    for name, colour in {
        "black": (0, 0, 0),
        "white": (255, 255, 255),
        "grey": (128, 128, 128),
        "skin_light": (232, 190, 172),
        "skin_dark": (141, 85, 36),
    }.items():
        add(f"blank_{name}", np.broadcast_to(np.array(colour), (h, w, 3)))
    for i in range(4):
        add(f"noise_uniform_{i}", rng.integers(0, 256, (h, w, 3)))
        add(f"noise_gaussian_{i}", rng.normal(128, 40, (h, w, 3)))
        sp = np.full((h, w, 3), 128.0)
        mask = rng.random((h, w))
        sp[mask < 0.05], sp[mask > 0.95] = 0, 255
        add(f"noise_salt_pepper_{i}", sp)
        small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        add(f"noise_smooth_{i}", np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)))
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, w)[None, :, None] if i % 2 == 0 else np.linspace(0, 1, h)[:, None, None]
        add(f"gradient_{i}", a + (b - a) * t * np.ones((h, w, 1)))
        k = int(rng.integers(8, 32))
        board = ((np.arange(h)[:, None] // k + np.arange(w)[None, :] // k) % 2).astype(float)[..., None]
        add(f"checkerboard_{i}", 255 * board * np.ones((1, 1, 3)))
        add(f"screenshot_{i}", _screenshot(rng, h, w))
    return out


def ood_images(seed: int = 0) -> list[OodImage]:
    """Every photograph and synthetic image (see the module docstring)."""
    return photographs() + synthetic(seed)
