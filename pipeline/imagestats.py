"""Per-image statistics of a dermoscopic image: the pure computation behind the ``eda`` stage.

One function, :func:`image_features`, turns an ``(H, W, 3)`` uint8 RGB array into a flat dict of
scalars (one row of the EDA feature table). It is a pure function of the pixels and a
:class:`FeatureConfig`, vectorised with numpy / ``scipy.ndimage`` (no per-pixel Python loops), so
the ``eda`` stage can run it over a process pool, the Prefect flow can shard it over Dask, and
drift monitoring and the service can reuse it on single images. It depends on numpy and scipy only
(plus :mod:`pipeline.images` in :func:`features_for_file`), never on pandas, DVC or Prefect.

What it computes (all on a *working copy* resized so that its longer side is at most
``FeatureConfig.working_max_side`` pixels, so that 200x150 and 600x450 images are treated alike,
sampled at every ``pixel_stride``-th pixel; sizes are reported in the original's pixels):

* **image**: width, height, aspect ratio (w/h); brightness = mean Rec. 601 luma Y' in [0, 1];
  contrast = RMS contrast (std of Y') and the robust 5-95 percentile range of Y' (quantiles
  read from a 256-bin histogram, so in steps of 1/255); mean and std of
  R, G, B (in [0, 1]), of CIELAB L*, a*, b* (D65) and of HSV saturation and value.
* **segmentation** (classical, for dermoscopy): L* channel (block-averaged to a longer side of
  ``segment_max_side``, 100 px by default: 4x fewer pixels, same result) -> grey closing (removes thin dark
  hair) -> Gaussian smoothing -> dark vignette corners (dark regions connected to a corner and
  lying almost entirely outside the central ellipse), grown by ``vignette_margin`` pixels, excluded
  from the field of view -> Otsu
  threshold within the field of view -> connected components of the dark side -> the component
  with the largest centre-weighted area (pixel weight ``1 - r``, r the normalised distance from
  the centre; a component that touches the frame and lies mostly (> 70%) at r >= 0.6 - shading
  or a vignette's soft edge - has its score divided by 20) -> holes filled. The segmentation *fails* (``seg_ok = False``, a ``seg_status``
  reason, every lesion feature NaN) but never raises when: the image is flat (``flat``); no
  component is found (``empty``); the lesion covers less than ``min_area_fraction`` (``too_small``)
  or more than ``max_area_fraction`` of the image (``too_large``: no skin left to compare with);
  or the lesion is not darker than the surrounding skin by ``min_contrast`` L* units
  (``low_contrast``, e.g. an image of plain skin).
* **lesion shape** from the mask: bounding-box width / height (pixels and relative to the image),
  area fraction, bounding-box aspect ratio, elongation (sqrt of the ratio of the principal
  second moments), border compactness ``4*pi*A/P**2`` (1 for a disc, smaller for an irregular
  border; P from the crack length times pi/4), and an asymmetry score: the share of lesion pixels
  whose mirror image across the principal axes falls outside the lesion (mean of both axes;
  0 for a symmetric shape).
* **lesion colour**: mean / std of L*, a*, b* and mean R, G, B inside the lesion; the mean L* of
  the surrounding skin; the lesion's colour difference from the skin (CIE76 delta E) and its
  lightness contrast. **ABCD colours**: the image is white-balanced (shades of grey, Minkowski
  norm ``colour_constancy_p``, gains estimated on every 4th pixel) so that the camera's colour
  cast does not decide the colour, then every lesion pixel is assigned to one of the six
  dermoscopic colours of the ABCD rule (white, red, light brown, dark brown, blue-grey, black) or
  to none by the documented CIELAB thresholds of :class:`ColourRules`; a colour is *present* when
  it covers at least ``colour_min_share`` of the lesion. ``colour_share_*`` gives the shares,
  ``colour_*`` the 0/1 presence, ``n_colours`` their count (the C of ABCD).
* **dominant colours**: a k-means palette (``palette_k`` clusters, ``palette_iters`` fixed Lloyd
  iterations, deterministic L*-quantile initialisation) of at most ``palette_samples`` lesion pixels
  (a deterministic stride subsample) in white-balanced CIELAB; clusters sorted by share;
  ``dominant_colour`` is the ABCD colour of the largest cluster ("other" when none applies).

Cost: a few ms of one core per 200x150 image (plus 0.4 ms JPEG decoding), see
``benchmarks/eda_throughput.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

#: The six dermoscopic colours of the ABCD rule, in the order of the feature columns.
ABCD_COLOURS: tuple[str, ...] = ("white", "red", "light_brown", "dark_brown", "blue_grey", "black")

#: A typical sRGB value of each colour as it looks in a colour-balanced dermoscopy image (used by
#: the tests and the report's legend; each is classified as its own colour by the rules below).
ABCD_EXAMPLES: dict[str, tuple[int, int, int]] = {
    "white": (225, 225, 225),
    "red": (200, 70, 90),
    "light_brown": (170, 125, 100),
    "dark_brown": (95, 60, 45),
    "blue_grey": (100, 115, 140),
    "black": (25, 22, 22),
}


@dataclasses.dataclass(frozen=True)
class ColourRules:
    """Thresholds of the ABCD colour detector, in CIELAB after colour constancy.

    A lesion pixel (L*, a*, b*, chroma C = sqrt(a*^2 + b*^2)) takes the first colour whose rule
    holds, in this order, or none:

    1. black:        L* < black_max_l
    2. white:        L* >= white_min_l and C < white_max_chroma
    3. blue-grey:    b* <= blue_max_b and a* < blue_max_a and L* < blue_max_l (bluish, not purple)
    4. red:          a* >= red_min_a and a* >= red_hue_ratio * b* (red to purple hues)
    5. dark brown:   L* < dark_brown_max_l and C >= brown_min_chroma and a* > 0
    6. light brown:  L* < light_brown_max_l and C >= brown_min_chroma and a* > 0 and b* > 0

    Pixels matching none (skin-like, grey, green, ...) count towards no colour.
    """

    black_max_l: float = 22.0
    white_min_l: float = 78.0
    white_max_chroma: float = 12.0
    blue_max_b: float = -4.0
    blue_max_a: float = 12.0
    blue_max_l: float = 65.0
    red_min_a: float = 25.0
    red_hue_ratio: float = 2.0
    dark_brown_max_l: float = 40.0
    light_brown_max_l: float = 68.0
    brown_min_chroma: float = 8.0


def classify_colours(lab: np.ndarray, rules: ColourRules = ColourRules()) -> np.ndarray:
    """Index into :data:`ABCD_COLOURS` of each CIELAB pixel of ``(n, 3)`` or ``(3, n)`` planes
    given as ``(L, a, b)`` arrays; -1 where no rule holds. See :class:`ColourRules`."""
    L, a, b = lab
    chroma = np.hypot(a, b)
    out = np.full(L.shape, -1, dtype=np.int8)
    rules_in_order = [
        (ABCD_COLOURS.index("black"), L < rules.black_max_l),
        (ABCD_COLOURS.index("white"), (L >= rules.white_min_l) & (chroma < rules.white_max_chroma)),
        (ABCD_COLOURS.index("blue_grey"), (b <= rules.blue_max_b) & (a < rules.blue_max_a) & (L < rules.blue_max_l)),
        (ABCD_COLOURS.index("red"), (a >= rules.red_min_a) & (a >= rules.red_hue_ratio * b)),
        (ABCD_COLOURS.index("dark_brown"), (L < rules.dark_brown_max_l) & (chroma >= rules.brown_min_chroma) & (a > 0)),
        (ABCD_COLOURS.index("light_brown"),
         (L < rules.light_brown_max_l) & (chroma >= rules.brown_min_chroma) & (a > 0) & (b > 0)),
    ]
    for idx, hit in reversed(rules_in_order):  # earlier rules overwrite later ones: first match wins
        out[hit] = idx
    return out


def colour_constancy_gains(f: np.ndarray, p: float) -> np.ndarray:
    """Shades-of-grey white balance (Finlayson & Trezzi 2004; for dermoscopy Barata et al. 2015):
    per-channel gains ``mean(e) / e_c`` with ``e_c = mean(I_c ** p) ** (1/p)``, from ``(3, n)``
    planes in [0, 1]. ``p = 0`` disables it (gains of 1)."""
    if p <= 0:
        return np.ones(3, dtype=np.float32)
    if float(p).is_integer() and p <= 16:  # repeated multiplication: much faster than pow
        acc, base, k = np.ones_like(f, dtype=np.float32), f.astype(np.float32), int(p)
        while k:
            if k & 1:
                acc = acc * base
            k >>= 1
            if k:
                base = base * base
        powered = acc
    else:
        powered = np.power(f.astype(np.float32), np.float32(p))
    e = np.power(powered.mean(axis=1).astype(np.float64), 1.0 / p)
    e = np.maximum(e, 1e-6)
    return (e.mean() / e).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Knobs of :func:`image_features` (the ``eda`` section of params.yaml maps onto these).

    Statistics use every ``pixel_stride``-th pixel (in both directions) of the working copy (longer
    side ``working_max_side``): a regular, unbiased sample - 7,500 of the 30,000 pixels of a 200x150
    image at the default stride 2 - that keeps means, spreads and percentiles while cutting the
    cost 4x (``pixel_stride: 1`` uses every pixel). The segmentation runs on
    its L* plane block-averaged to a longer side of at most ``segment_max_side`` (so ``hair_kernel``
    and ``smooth_sigma`` are in those pixels) and the mask is upsampled back for the colour
    statistics.
    """

    working_max_side: int = 200
    pixel_stride: int = 2
    segment_max_side: int = 100
    hair_kernel: int = 3
    smooth_sigma: float = 1.0
    vignette_max_l: float = 25.0
    vignette_margin: int = 3
    min_area_fraction: float = 0.005
    max_area_fraction: float = 0.90
    min_contrast: float = 6.0
    colour_constancy_p: float = 6.0
    colour_rules: ColourRules = ColourRules()
    colour_min_share: float = 0.05
    palette_k: int = 3
    palette_samples: int = 256
    palette_iters: int = 8

    def __post_init__(self) -> None:
        if self.working_max_side < 16:
            raise ValueError(f"working_max_side must be at least 16, got {self.working_max_side}")
        if self.pixel_stride < 1:
            raise ValueError(f"pixel_stride must be at least 1, got {self.pixel_stride}")
        if self.segment_max_side < 16:
            raise ValueError(f"segment_max_side must be at least 16, got {self.segment_max_side}")
        if self.hair_kernel < 1:
            raise ValueError(f"hair_kernel must be at least 1, got {self.hair_kernel}")
        if not 0 <= self.min_area_fraction < self.max_area_fraction <= 1:
            raise ValueError("need 0 <= min_area_fraction < max_area_fraction <= 1")
        if self.palette_k < 1 or self.palette_samples < self.palette_k or self.palette_iters < 1:
            raise ValueError("need palette_k >= 1, palette_samples >= palette_k, palette_iters >= 1")
        if self.colour_constancy_p < 0:
            raise ValueError(f"colour_constancy_p must be >= 0, got {self.colour_constancy_p}")

    @property
    def colour_names(self) -> tuple[str, ...]:
        return ABCD_COLOURS


DEFAULT_CONFIG = FeatureConfig()

#: Feature groups (used by the report to lay out plots); every key of :func:`image_features`
#: except ``seg_ok``, ``seg_status`` and ``dominant_colour`` is numeric.
IMAGE_FEATURES: tuple[str, ...] = (
    "width", "height", "aspect_ratio", "brightness", "contrast_rms", "contrast_p5_95",
    "r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std",
    "lab_l_mean", "lab_a_mean", "lab_b_mean", "lab_l_std", "lab_a_std", "lab_b_std",
    "hsv_s_mean", "hsv_v_mean", "hsv_s_std", "hsv_v_std",
)
LESION_SHAPE_FEATURES: tuple[str, ...] = (
    "lesion_width_px", "lesion_height_px", "lesion_width_rel", "lesion_height_rel",
    "lesion_area_fraction", "lesion_aspect_ratio", "lesion_elongation",
    "border_compactness", "asymmetry", "lesion_centre_offset",
)
LESION_COLOUR_FEATURES: tuple[str, ...] = (
    "lesion_lab_l_mean", "lesion_lab_a_mean", "lesion_lab_b_mean", "lesion_lab_l_std", "lesion_lab_a_std",
    "lesion_lab_b_std", "lesion_r_mean", "lesion_g_mean", "lesion_b_mean", "skin_lab_l_mean",
    "lesion_skin_delta_e", "lesion_skin_contrast",
)


def colour_features(config: FeatureConfig = DEFAULT_CONFIG) -> tuple[str, ...]:
    names = config.colour_names
    return (*(f"colour_share_{n}" for n in names), *(f"colour_{n}" for n in names), "n_colours")


def palette_features(config: FeatureConfig = DEFAULT_CONFIG) -> tuple[str, ...]:
    return tuple(
        f"palette{i}_{part}" for i in range(config.palette_k) for part in ("l", "a", "b", "share")
    )


def lesion_features(config: FeatureConfig = DEFAULT_CONFIG) -> tuple[str, ...]:
    """Every feature that is NaN when the segmentation fails."""
    return LESION_SHAPE_FEATURES + LESION_COLOUR_FEATURES + colour_features(config) + palette_features(config)


def feature_names(config: FeatureConfig = DEFAULT_CONFIG) -> tuple[str, ...]:
    """The keys of :func:`image_features`, in order."""
    return IMAGE_FEATURES + ("seg_ok", "seg_status") + lesion_features(config) + ("dominant_colour",)


# ----------------------------------------------------------------------------------------------
# colour spaces

_SRGB_TO_LINEAR = np.where(
    (v := np.arange(256, dtype=np.float64) / 255.0) <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4
).astype(np.float32)
# sRGB (D65) -> XYZ, rows pre-divided by the D65 white point so that white maps to (1, 1, 1).
_RGB_TO_XYZN = (
    np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
    )
    / np.array([[0.95047], [1.0], [1.08883]])
).astype(np.float32)
_EPS = (6.0 / 29.0) ** 3


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of uint8 sRGB values, any leading shape ``(..., 3)`` -> float32 ``(..., 3)``."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    planes = lab_planes(rgb.reshape(-1, 3).T)
    return np.ascontiguousarray(planes.T).reshape(rgb.shape)


def lab_planes(rgb_planes: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of uint8 sRGB planes ``(3, N)`` -> float32 planes ``(3, N)`` (L*, a*, b*)."""
    lin = _SRGB_TO_LINEAR[rgb_planes]  # (3, N) float32
    f = _lab_f(_RGB_TO_XYZN @ lin)  # rows X/Xn, Y/Yn, Z/Zn
    out = np.empty_like(f)
    np.multiply(f[1], 116.0, out=out[0])
    out[0] -= 16.0
    np.subtract(f[0], f[1], out=out[1])
    out[1] *= 500.0
    np.subtract(f[1], f[2], out=out[2])
    out[2] *= 200.0
    return out


# f(t) of the CIELAB definition, tabulated on [0, 1.25] (XYZ/white of sRGB stays below 1.09):
# a table look-up is several times faster than cube roots; the error is below 0.02 L* units.
_F_STEPS = 65536
_F_MAX = 1.25
_F_TABLE = (lambda t: np.where(t > _EPS, np.cbrt(t), t / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0))(
    np.linspace(0.0, _F_MAX, _F_STEPS)
).astype(np.float32)


def _lab_f(t: np.ndarray) -> np.ndarray:
    # t = XYZ / white of an sRGB colour lies in [0, 1.09]: no clipping needed below _F_MAX
    scaled = t * np.float32((_F_STEPS - 1) / _F_MAX)
    scaled += np.float32(0.5)
    return _F_TABLE[scaled.astype(np.int32)]


# ----------------------------------------------------------------------------------------------
# helpers


def working_copy(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """``rgb`` resized (area averaging, never upscaled) so that its longer side is <= max_side."""
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return rgb
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    from PIL import Image  # pillow is a dependency of the project; imported lazily

    img = Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def sampled_copy(rgb: np.ndarray, config: FeatureConfig = DEFAULT_CONFIG) -> np.ndarray:
    """The pixels the statistics are computed on: every ``pixel_stride``-th pixel of the working copy."""
    work = working_copy(rgb, config.working_max_side)
    s = config.pixel_stride
    return np.ascontiguousarray(work[::s, ::s]) if s > 1 else work


def lesion_mask(rgb: np.ndarray, config: FeatureConfig = DEFAULT_CONFIG) -> tuple[np.ndarray, np.ndarray, str]:
    """(working copy, lesion mask at the working copy's size, seg_status) exactly as
    :func:`image_features` segments ``rgb`` (for drawing contours)."""
    work = working_copy(rgb, config.working_max_side)
    sampled = sampled_copy(rgb, config)
    seg = segment(sampled, config)
    mask = _upsample(seg.mask, seg.factor * config.pixel_stride, *work.shape[:2]) if seg.ok else np.zeros(work.shape[:2], bool)
    return work, mask, seg.status


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float | None:
    """Otsu's threshold of a 1-D sample (histogram-based); None when the sample is flat."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return None
    step = (hi - lo) / bins
    idx = ((values - lo) * (1.0 / step)).astype(np.int32)
    np.minimum(idx, bins - 1, out=idx)  # the maximum falls in the last bin, as in np.histogram
    hist = np.bincount(idx, minlength=bins).astype(np.float64)
    edges = lo + step * np.arange(bins + 1)
    centres = edges[:-1] + step / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[w1 <= 0] = 0
    return float(edges[int(np.argmax(between)) + 1])


@functools.lru_cache(maxsize=8)
def _centre_weight(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight ``1 - r`` clipped at 0, normalised radius r) on an h x w grid (r = 1 at the edge midpoints)."""
    yy = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / (h / 2)
    xx = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / (w / 2)
    r = np.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    return np.clip(1.0 - r / math.sqrt(2), 0.0, 1.0), r


@functools.lru_cache(maxsize=8)
def _frame(h: int, w: int) -> np.ndarray:
    """Boolean h x w array that is True on the outermost rows and columns."""
    frame = np.zeros((h, w), dtype=bool)
    frame[[0, -1], :] = True
    frame[:, [0, -1]] = True
    return frame


def _upsample(a: np.ndarray, factor: int, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour ``factor`` x upsampling of a 2-d array to exactly ``h x w`` (edge
    rows/columns repeated where the grid was cropped)."""
    if a.all() or not a.any():  # constant: no need to move pixels
        return np.full((h, w), bool(a.flat[0]) if a.size else False, dtype=a.dtype)
    up = a.repeat(factor, axis=0).repeat(factor, axis=1)
    if up.shape[0] < h or up.shape[1] < w:
        up = np.pad(up, ((0, max(0, h - up.shape[0])), (0, max(0, w - up.shape[1]))), mode="edge")
    return up[:h, :w]


@dataclasses.dataclass
class Segmentation:
    """The lesion mask and why it failed (``status != "ok"``).

    ``mask`` and ``fov`` are on the segmentation grid, ``factor`` times coarser than the image
    that was segmented; :meth:`upsampled` brings them back to that image's size.
    """

    mask: np.ndarray  # bool (hs, ws); all False when failed
    fov: np.ndarray  # bool field of view (vignette excluded)
    status: str
    factor: int = 1
    contrast: float = float("nan")  # mean L* of skin minus mean L* of lesion (smoothed)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def upsampled(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask, fov) at ``h x w`` (nearest neighbour; edge rows/columns of a cropped block repeat)."""
        if self.factor == 1 and self.mask.shape == (h, w):
            return self.mask, self.fov
        return _upsample(self.mask, self.factor, h, w), _upsample(self.fov, self.factor, h, w)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the image border filled."""
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep = np.zeros(n + 1, dtype=bool)
    keep[border] = True
    keep[0] = True  # label 0 is the mask itself
    return mask | ~keep[labels]


def block_mean(plane: np.ndarray, factor: int) -> np.ndarray:
    """``plane`` averaged over ``factor x factor`` blocks (trailing rows/columns cropped)."""
    if factor == 1:
        return plane
    h, w = plane.shape
    hs, ws = max(1, h // factor), max(1, w // factor)
    if h < factor or w < factor:
        return plane
    out = np.zeros((hs, ws), dtype=plane.dtype)
    for dy in range(factor):  # factor**2 strided additions: faster than a 4-d mean
        for dx in range(factor):
            out += plane[dy : hs * factor : factor, dx : ws * factor : factor]
    out *= 1.0 / (factor * factor)
    return out


def segmentation_factor(h: int, w: int, config: FeatureConfig = DEFAULT_CONFIG) -> int:
    return max(1, math.ceil(max(h, w) / config.segment_max_side))


def segment(
    work: np.ndarray, config: FeatureConfig = DEFAULT_CONFIG, lightness: np.ndarray | None = None
) -> Segmentation:
    """Segment the lesion of a working-size RGB image (see the module docstring). Never raises.

    ``lightness``: the image's L* plane ``(h, w)`` when already computed.
    """
    h, w = work.shape[:2]
    if lightness is None:
        lightness = lab_planes(np.ascontiguousarray(work.reshape(-1, 3).T))[0].reshape(h, w)
    factor = segmentation_factor(h, w, config)
    light = block_mean(lightness, factor)
    if light is lightness and factor > 1:
        factor = 1
    hs, ws = light.shape
    if config.hair_kernel > 1:
        light = ndimage.grey_closing(light, size=(config.hair_kernel, config.hair_kernel))
    if config.smooth_sigma > 0:
        light = ndimage.gaussian_filter(light, config.smooth_sigma)
    weight, radius = _centre_weight(hs, ws)
    empty = np.zeros((hs, ws), dtype=bool)

    def failed(status: str, fov: np.ndarray, contrast: float = float("nan")) -> Segmentation:
        return Segmentation(empty, fov, status, factor, contrast)

    # dark vignette: dark regions touching a corner and lying almost entirely off-centre
    fov = np.ones((hs, ws), dtype=bool)
    dark = light < config.vignette_max_l
    if dark[0, 0] or dark[0, -1] or dark[-1, 0] or dark[-1, -1]:
        labels, _ = ndimage.label(dark)
        corners = ((0, 0), (0, ws - 1), (hs - 1, 0), (hs - 1, ws - 1))
        ids = np.array(sorted({int(labels[y, x]) for y, x in corners} - {0}))
        flat = labels.ravel()
        inner = np.bincount(flat, weights=(radius < 0.6).ravel())[ids]
        size = np.bincount(flat)[ids]
        vignette = ids[inner <= 0.05 * size]
        if len(vignette):
            # grown by a few pixels so that the soft edge of the vignette is not taken for a lesion
            fov = ~ndimage.binary_dilation(np.isin(labels, vignette), iterations=config.vignette_margin)
    if np.count_nonzero(fov) < 0.2 * hs * ws:
        return failed("flat", fov)

    t = otsu_threshold(light[fov])
    if t is None:
        return failed("flat", fov)
    labels, n = ndimage.label((light <= t) & fov)
    if n == 0:
        return failed("empty", fov)
    ids = np.arange(1, n + 1)
    flat = labels.ravel()
    scores = np.bincount(flat, weights=weight.ravel(), minlength=n + 1)[1:]
    # a component lying mostly in the periphery and touching the frame is shading or the soft edge
    # of a vignette rather than the lesion: it only wins when nothing central is there
    size = np.bincount(flat, minlength=n + 1)[1:]
    peripheral = np.bincount(flat, weights=(radius >= 0.6).ravel(), minlength=n + 1)[1:] / size
    touches = np.bincount(labels[_frame(hs, ws)], minlength=n + 1)[1:] > 0
    scores = np.where(touches & (peripheral > 0.7), scores * 0.05, scores)
    best = int(np.argmax(scores)) + 1
    if scores[best - 1] <= 0:
        return failed("empty", fov)
    mask = fill_holes(labels == best)
    area = np.count_nonzero(mask) / (hs * ws)
    if area < config.min_area_fraction:
        return failed("too_small", fov)
    if area > config.max_area_fraction:
        return failed("too_large", fov)
    skin = fov & ~mask
    if np.count_nonzero(skin) < 0.02 * hs * ws:
        return failed("too_large", fov)
    contrast = float(light[skin].mean() - light[mask].mean())
    if contrast < config.min_contrast:
        return failed("low_contrast", fov, contrast)
    return Segmentation(mask, fov, "ok", factor, contrast)


def _shape_features(mask: np.ndarray, scale_x: float, scale_y: float) -> dict[str, float]:
    h, w = mask.shape
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bh = rows[-1] - rows[0] + 1
    bw = cols[-1] - cols[0] + 1
    area = float(mask.sum())
    # crack length (4-connected boundary edges, the image frame included) times pi/4 estimates
    # the perimeter of a smooth shape without the 4/pi bias of counting pixel edges
    padded = np.pad(mask, 1)
    crack = np.count_nonzero(padded[1:, :] != padded[:-1, :]) + np.count_nonzero(padded[:, 1:] != padded[:, :-1])
    perimeter = crack * math.pi / 4
    compactness = min(1.0, 4 * math.pi * area / perimeter**2) if perimeter > 0 else float("nan")
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    dy, dx = ys - cy, xs - cx
    # principal axes of the 2x2 second-moment matrix [[sxx, sxy], [sxy, syy]], in closed form
    sxx, syy, sxy = float(dx @ dx) / len(dx), float(dy @ dy) / len(dy), float(dx @ dy) / len(dx)
    half_diff = (sxx - syy) / 2
    root = math.hypot(half_diff, sxy)
    lam_major, lam_minor = (sxx + syy) / 2 + root, (sxx + syy) / 2 - root
    theta = 0.5 * math.atan2(2 * sxy, sxx - syy)
    major = (math.cos(theta), math.sin(theta))
    minor = (-math.sin(theta), math.cos(theta))
    # + 1/12: the variance of a pixel's own extent, so a one-pixel-wide line stays finite
    elongation = math.sqrt((lam_major + 1 / 12) / (lam_minor + 1 / 12))
    p1 = dx * major[0] + dy * major[1]
    p2 = dx * minor[0] + dy * minor[1]
    asym = []
    for a1, a2 in ((p1, -p2), (-p1, p2)):  # mirror across the major axis, then the minor axis
        rx = np.rint(cx + a1 * major[0] + a2 * minor[0]).astype(np.int64)
        ry = np.rint(cy + a1 * major[1] + a2 * minor[1]).astype(np.int64)
        inside = (rx >= 0) & (rx < w) & (ry >= 0) & (ry < h)
        hit = np.zeros(len(rx), dtype=bool)
        hit[inside] = mask[ry[inside], rx[inside]]
        asym.append(1.0 - hit.mean())
    offset = math.hypot((cx - (w - 1) / 2) / (w / 2), (cy - (h - 1) / 2) / (h / 2))
    return {
        "lesion_width_px": float(bw * scale_x),
        "lesion_height_px": float(bh * scale_y),
        "lesion_width_rel": float(bw / w),
        "lesion_height_rel": float(bh / h),
        "lesion_area_fraction": area / (h * w),
        "lesion_aspect_ratio": float((bw * scale_x) / (bh * scale_y)),
        "lesion_elongation": elongation,
        "border_compactness": compactness,
        "asymmetry": float(np.mean(asym)),
        "lesion_centre_offset": offset,
    }


def colour_presence(
    lab_planes_: np.ndarray, config: FeatureConfig = DEFAULT_CONFIG
) -> tuple[np.ndarray, np.ndarray]:
    """(shares, present) of the six ABCD colours among CIELAB pixels given as ``(3, n)`` planes.

    Each pixel is classified by :func:`classify_colours`; a colour is present when its share of
    the pixels reaches ``colour_min_share``.
    """
    n = lab_planes_.shape[1]
    if n == 0:
        return np.zeros(len(ABCD_COLOURS)), np.zeros(len(ABCD_COLOURS), dtype=bool)
    idx = classify_colours(lab_planes_, config.colour_rules)
    shares = np.bincount(idx[idx >= 0], minlength=len(ABCD_COLOURS)) / n
    return shares, shares >= config.colour_min_share


def kmeans_palette(
    lab_pixels: np.ndarray, k: int, iters: int, max_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """(centres (k, 3), shares (k,)) of a k-means palette, sorted by share (largest first).

    Deterministic: a stride subsample of at most ``max_samples`` pixels, centres initialised at
    the L* quantiles, ``iters`` Lloyd iterations. An empty cluster keeps its centre (share 0).
    """
    x = np.asarray(lab_pixels, dtype=np.float32)
    if len(x) > max_samples:
        x = x[np.linspace(0, len(x) - 1, max_samples).astype(np.int64)]
    order = np.argsort(x[:, 0], kind="stable")
    centres = x[order[((np.arange(k) + 0.5) / k * len(x)).astype(np.int64)]]
    xx = (x * x).sum(axis=1, keepdims=True)
    ks = np.arange(k)
    counts = np.zeros(k)
    for _ in range(iters):
        d2 = xx - 2.0 * (x @ centres.T) + (centres * centres).sum(axis=1)
        onehot = (d2.argmin(axis=1)[:, None] == ks).astype(np.float32)  # (n, k)
        counts = onehot.sum(axis=0)
        sums = onehot.T @ x  # (k, 3)
        centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
    shares = counts / len(x)
    idx = np.argsort(-shares, kind="stable")
    return centres[idx].astype(np.float32), shares[idx]


# ----------------------------------------------------------------------------------------------
# the features


def _mean_std(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean and (population) std of float32 ``(c, n)`` planes (pairwise summation, centred)."""
    mean = planes.mean(axis=1)
    d = planes - mean[:, None]
    return mean.astype(np.float64), np.sqrt(np.einsum("ij,ij->i", d, d) / planes.shape[1]).astype(np.float64)


# rows of the stacked planes of image_features
_R, _G, _B, _L, _A, _BB, _S, _V, _Y = range(9)


def image_features(rgb: np.ndarray, config: FeatureConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """The statistics of one ``(H, W, 3)`` uint8 RGB image as a flat dict (keys: :func:`feature_names`).

    Never raises for a valid array; when the segmentation fails, ``seg_ok`` is False,
    ``seg_status`` says why, the lesion features are NaN and ``dominant_colour`` is "".
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    work = sampled_copy(rgb, config)
    h, w = work.shape[:2]
    planes8 = np.ascontiguousarray(work.reshape(-1, 3).T)  # (3, N) uint8
    n_px = planes8.shape[1]
    planes = np.empty((9, n_px), dtype=np.float32)  # R G B L* a* b* S V Y' (see _R ... _Y)
    f = planes[_R : _B + 1]
    np.multiply(planes8, np.float32(1 / 255), out=f)
    planes[_L : _BB + 1] = lab_planes(planes8)
    vmax, vmin = planes[_V], planes[_S]
    np.maximum(np.maximum(f[0], f[1], out=vmax), f[2], out=vmax)
    np.minimum(np.minimum(f[0], f[1], out=vmin), f[2], out=vmin)
    np.subtract(vmax, vmin, out=vmin)
    vmin /= np.maximum(vmax, np.float32(1e-6))  # now the saturation
    luma = planes[_Y]
    np.multiply(f[0], np.float32(0.299), out=luma)
    luma += np.float32(0.587) * f[1]
    luma += np.float32(0.114) * f[2]
    cdf = np.cumsum(np.bincount((luma * np.float32(255) + np.float32(0.5)).astype(np.int32), minlength=256))
    p5, p95 = np.searchsorted(cdf, [0.05 * n_px, 0.95 * n_px]) / 255.0
    mean, std = _mean_std(planes)
    out: dict[str, Any] = {
        "width": int(width),
        "height": int(height),
        "aspect_ratio": width / height,
        "brightness": float(mean[_Y]),
        "contrast_rms": float(std[_Y]),
        "contrast_p5_95": float(p95 - p5),
        "r_mean": float(mean[_R]), "g_mean": float(mean[_G]), "b_mean": float(mean[_B]),
        "r_std": float(std[_R]), "g_std": float(std[_G]), "b_std": float(std[_B]),
        "lab_l_mean": float(mean[_L]), "lab_a_mean": float(mean[_A]), "lab_b_mean": float(mean[_BB]),
        "lab_l_std": float(std[_L]), "lab_a_std": float(std[_A]), "lab_b_std": float(std[_BB]),
        "hsv_s_mean": float(mean[_S]), "hsv_v_mean": float(mean[_V]),
        "hsv_s_std": float(std[_S]), "hsv_v_std": float(std[_V]),
    }
    seg = segment(work, config, planes[_L].reshape(h, w))
    hs, ws = seg.mask.shape
    out["seg_ok"] = seg.ok
    out["seg_status"] = seg.status
    if not seg.ok:
        out.update({name: float("nan") for name in lesion_features(config)})
        out["dominant_colour"] = ""
        return out

    out.update(_shape_features(seg.mask, width / ws, height / hs))
    mask, fov = seg.upsampled(h, w)
    m = mask.reshape(-1)
    lesion = planes[: _BB + 1, m]  # (6, n): R G B L* a* b*
    les_lab = lesion[_L : _BB + 1]
    skin = (fov & ~mask).reshape(-1)
    skin_lab = planes[_L : _BB + 1, skin].mean(axis=1).astype(np.float64)
    lesion_mean, lesion_std = _mean_std(lesion)
    lm, ls, les_rgb = lesion_mean[_L : _BB + 1], lesion_std[_L : _BB + 1], lesion_mean[: _B + 1]
    out.update({
        "lesion_lab_l_mean": float(lm[0]), "lesion_lab_a_mean": float(lm[1]), "lesion_lab_b_mean": float(lm[2]),
        "lesion_lab_l_std": float(ls[0]), "lesion_lab_a_std": float(ls[1]), "lesion_lab_b_std": float(ls[2]),
        "lesion_r_mean": float(les_rgb[0]), "lesion_g_mean": float(les_rgb[1]),
        "lesion_b_mean": float(les_rgb[2]),
        "skin_lab_l_mean": float(skin_lab[0]),
        "lesion_skin_delta_e": float(np.sqrt(((lm - skin_lab) ** 2).sum())),
        "lesion_skin_contrast": seg.contrast,
    })
    # colours are judged after white balance, so that a magenta or yellow cast of the camera does
    # not turn every lesion red or brown
    gains = colour_constancy_gains(planes[: _B + 1, ::4], config.colour_constancy_p)  # every 4th pixel
    balanced = np.minimum(lesion[: _B + 1] * gains[:, None], np.float32(1.0))
    bal_lab = lab_planes((balanced * np.float32(255) + np.float32(0.5)).astype(np.uint8))
    shares, present = colour_presence(bal_lab, config)
    for name, share, pres in zip(config.colour_names, shares, present):
        out[f"colour_share_{name}"] = float(share)
        out[f"colour_{name}"] = float(pres)
    out["n_colours"] = float(present.sum())
    centres, pshares = kmeans_palette(np.ascontiguousarray(bal_lab.T), config.palette_k, config.palette_iters, config.palette_samples)
    for i, (c, s) in enumerate(zip(centres, pshares)):
        out[f"palette{i}_l"], out[f"palette{i}_a"], out[f"palette{i}_b"] = (float(v) for v in c)
        out[f"palette{i}_share"] = float(s)
    dominant = int(classify_colours(centres[:1].T, config.colour_rules)[0])
    out["dominant_colour"] = ABCD_COLOURS[dominant] if dominant >= 0 else "other"
    return out


def features_for_file(path: Path | str, config: FeatureConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Decode ``path`` (via :func:`pipeline.images.decode_rgb`) and return its features with
    ``image_id`` (the file stem) first. Raises :class:`pipeline.images.ImageError` naming the file."""
    from pipeline.images import decode_rgb

    path = Path(path)
    return {"image_id": path.stem, **image_features(decode_rgb(path, str(path)), config)}


def features_for_files(paths: list[Path | str] | tuple, config: FeatureConfig = DEFAULT_CONFIG) -> list[dict[str, Any]]:
    """:func:`features_for_file` over a chunk of files (the unit of work of the parallel runners)."""
    return [features_for_file(p, config) for p in paths]
