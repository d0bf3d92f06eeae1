"""Images that are not dermoscopic lesions, to measure the out-of-distribution detector with,
without downloading anything. Each has a ``kind`` (:data:`KINDS`):

* ``natural_photo``: the sample photographs that ship inside installed packages (scikit-image's
  bundled ``skimage/data`` images, never its downloadable ones; scikit-learn's ``china.jpg`` and
  ``flower.jpg``): people, animals, objects, scenes, text, microscopy, a retina; each whole and as
  four corner crops of 60 %;
* ``object_closeup``: tight crops (30 % and 20 %) of those photographs: close-ups of non-skin objects;
* ``skin_no_dermoscope``: skin photographed without a dermoscope: crops of the face in
  scikit-image's astronaut photograph, and seeded renderings of skin under room light (shading,
  pores, hairs, a mole or two, slightly out of focus);
* ``uniform`` and ``near_uniform``: blank frames (black, white, grey, skin-coloured), then with
  faint noise and vignetting;
* ``gradient``, ``noise`` (uniform, Gaussian, salt-and-pepper, smooth), ``pattern``
  (checkerboards, stripes) and ``text_screenshot`` (text pages and window-like renderings), seeded.

Every image is an ``(H, W, 3)`` uint8 array at least 64x64 (the smallest the service accepts), so
the detector, not the size check, has to catch it. Each has a ``source`` (a photograph and its
crops share one) and a ``half``: within each kind the sources are dealt alternately, in an order
fixed by their names' md5, into ``choose`` (where methods and thresholds may be chosen) and
``report`` (where the chosen method is measured: the evaluation's gate uses this half only). Which
images and why: ``docs/trust.md``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.core import images

#: Grayscale or tiny bundled files that are not photographs of anything (or below 64x64).
_SKIP = {"lbpcascade_frontalface_opencv.xml", "lfw_subset.npy", "motorcycle_disp.npz", "multipage.tif"}
_PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")
#: The kinds of image, in the order reports list them.
KINDS = (
    "natural_photo",
    "object_closeup",
    "skin_no_dermoscope",
    "uniform",
    "near_uniform",
    "gradient",
    "noise",
    "pattern",
    "text_screenshot",
)
HALVES = ("choose", "report")
#: The face in scikit-image's astronaut photograph (512x512): top-left corners of 80x80 crops.
_FACE_CROPS = ((100, 176), (120, 200), (80, 190), (130, 180))


@dataclass(frozen=True)
class OodImage:
    """One out-of-distribution image: its group (``photo`` or ``synthetic``), name, pixels, kind,
    source (shared by the views of one photograph) and half (``choose`` or ``report``)."""

    group: str
    name: str
    rgb: np.ndarray
    kind: str = ""
    source: str = ""
    half: str = ""


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


def _centre(rgb: np.ndarray, share: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    ch, cw = int(h * share), int(w * share)
    return rgb[(h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]


def photographs(min_side: int = 64) -> list[OodImage]:
    """The bundled sample photographs, whole and as four corner crops (``natural_photo``), and as
    tight centre and corner crops (``object_closeup``); those at least ``min_side``."""
    out: list[OodImage] = []
    for f in _bundled_files():
        try:
            rgb = images.decode_rgb(f, str(f))
        except images.ImageError:
            continue  # a bundled file PIL cannot read as an image
        views = [("natural_photo", "", rgb)] + [("natural_photo", f"_crop{i}", v) for i, v in enumerate(_crops(rgb), 1)]
        views += [("object_closeup", "_close30", _centre(rgb, 0.3)), ("object_closeup", "_close20", _centre(rgb, 0.2))]
        views += [("object_closeup", f"_corner20_{i}", v) for i, v in enumerate(_crops(rgb, 0.2)[:2], 1)]
        for kind, suffix, view in views:
            if min(view.shape[:2]) >= min_side:
                out.append(OodImage("photo", f.stem + suffix, np.ascontiguousarray(view), kind, f.stem))
    return out


def _skin(rng: np.random.Generator, h: int = 150, w: int = 200) -> np.ndarray:
    """Skin under room light, photographed without a dermoscope: a skin tone with shading, pores,
    a few hairs and a mole or two, slightly out of focus."""
    tone = np.array(rng.choice([(232, 190, 172), (205, 150, 120), (170, 115, 85), (120, 80, 55)]), dtype=float)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    light = 0.8 + 0.3 * (np.cos(rng.uniform(0, 6.3)) * xx + np.sin(rng.uniform(0, 6.3)) * yy)
    arr = tone * light[..., None] + rng.normal(0, 6, (h, w, 1))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy, r = int(rng.integers(30, w - 30)), int(rng.integers(30, h - 30)), int(rng.integers(3, 9))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in tone * 0.35))
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.line([x0, y0, x0 + int(rng.integers(-40, 40)), y0 + int(rng.integers(-40, 40))], fill=(60, 40, 30))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5)))), dtype=np.uint8)


def skin_photographs(seed: int = 0) -> list[OodImage]:
    """``skin_no_dermoscope``: the astronaut's face, cropped, and seeded renderings of skin."""
    out: list[OodImage] = []
    try:
        face = images.decode_rgb(Path(str(resources.files("skimage") / "data" / "astronaut.png")))
        for i, (y, x) in enumerate(_FACE_CROPS):
            out.append(
                OodImage(
                    "photo",
                    f"astronaut_face_{i}",
                    np.ascontiguousarray(face[y : y + 80, x : x + 80]),
                    "skin_no_dermoscope",
                    f"astronaut_face_{i}",
                )
            )
    except (ModuleNotFoundError, images.ImageError, OSError):
        pass
    rng = np.random.default_rng(seed + 1)
    for i in range(8):
        out.append(
            OodImage("synthetic", f"skin_room_light_{i}", _skin(rng), "skin_no_dermoscope", f"skin_room_light_{i}")
        )
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


def _page(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(img)
    step = int(rng.integers(10, 16))
    for y in range(6, h - 8, step):
        draw.text((6, y), "".join(rng.choice(list("abcdefghij klmnopqrst uvwxyz. "), size=45)), fill=(0, 0, 0))
    return np.asarray(img, dtype=np.uint8)


def synthetic(seed: int = 0, h: int = 150, w: int = 200) -> list[OodImage]:
    """Seeded blanks, near-blanks, noise, gradients, patterns and text or screenshot-like images
    (``h`` x ``w``)."""
    rng = np.random.default_rng(seed)
    out: list[OodImage] = []

    def add(kind: str, name: str, arr: np.ndarray) -> None:
        pixels = np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))
        out.append(OodImage("synthetic", name, pixels, kind, name))

    colours = {"black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128)}
    colours |= {"skin_light": (232, 190, 172), "skin_dark": (141, 85, 36), "beige": (200, 170, 140)}
    yy, xx = np.mgrid[0:h, 0:w]
    vignette = 1.0 - 0.25 * (((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2)[..., None] * 4
    for name, colour in colours.items():
        add("uniform", f"blank_{name}", np.broadcast_to(np.array(colour), (h, w, 3)))
        faint = np.array(colour) * vignette + rng.normal(0, float(rng.uniform(1.5, 5)), (h, w, 3))
        add("near_uniform", f"near_blank_{name}", faint)
    for i in range(6):
        add("noise", f"noise_uniform_{i}", rng.integers(0, 256, (h, w, 3)))
        add("noise", f"noise_gaussian_{i}", rng.normal(128, 40, (h, w, 3)))
        sp = np.full((h, w, 3), 128.0)
        mask = rng.random((h, w))
        sp[mask < 0.05], sp[mask > 0.95] = 0, 255
        add("noise", f"noise_salt_pepper_{i}", sp)
        small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        add("noise", f"noise_smooth_{i}", np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)))
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, w)[None, :, None] if i % 2 == 0 else np.linspace(0, 1, h)[:, None, None]
        add("gradient", f"gradient_{i}", a + (b - a) * t * np.ones((h, w, 1)))
        radial = np.clip(np.hypot(yy - h * rng.uniform(0.2, 0.8), xx - w * rng.uniform(0.2, 0.8)) / w, 0, 1)[..., None]
        add("gradient", f"gradient_radial_{i}", a + (b - a) * radial)
        k = int(rng.integers(8, 32))
        board = ((yy // k + xx // k) % 2).astype(float)[..., None]
        add("pattern", f"checkerboard_{i}", 255 * board * np.ones((1, 1, 3)))
        stripes = ((xx if i % 2 else yy) // int(rng.integers(4, 20)) % 2).astype(float)[..., None]
        add("pattern", f"stripes_{i}", a * stripes + b * (1 - stripes))
        add("text_screenshot", f"screenshot_{i}", _screenshot(rng, h, w))
        add("text_screenshot", f"text_page_{i}", _page(rng, h, w))
    return out


def _halves(found: list[OodImage]) -> list[OodImage]:
    """Deal each kind's sources alternately into :data:`HALVES`, in the order of their names' md5; a
    source already dealt with an earlier kind (a photograph's close-ups) stays in its half."""
    half: dict[str, str] = {}
    for kind in KINDS:
        sources = {o.source for o in found if o.kind == kind} - set(half)
        ordered = sorted(sources, key=lambda s: hashlib.md5(s.encode()).hexdigest())
        half |= {src: HALVES[i % 2] for i, src in enumerate(ordered)}
    return [replace(o, half=half[o.source]) for o in found]


def ood_images(seed: int = 0, half: str | None = None) -> list[OodImage]:
    """Every image of the module docstring with its half; only those of ``half`` when given."""
    if half is not None and half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    found = _halves(photographs() + skin_photographs(seed) + synthetic(seed))
    return [o for o in found if half is None or o.half == half]
