"""Per-image statistics of a dermoscopic image: the pure computation behind the ``eda`` stage.

One function, :func:`image_features`, turns an ``(H, W, 3)`` uint8 RGB array into a flat dict of
scalars (one row of the EDA feature table). It is a pure function of the pixels and a
:class:`FeatureConfig`, vectorised with numpy / ``scipy.ndimage`` (no per-pixel Python loops), so
the ``eda`` stage can run it over a process pool, the Prefect flow can shard it over Dask, and
drift monitoring and the service can reuse it on single images. It depends on numpy and scipy only
(plus :mod:`pipeline.core.images` in :func:`features_for_file`), never on pandas, DVC or Prefect.

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
  or a vignette's soft edge - has its score divided by 20) -> holes filled. The segmentation *fails*
  (``seg_ok = False``, a ``seg_status``
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

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.core.images import decode_rgb
from pipeline.core.params import ABCD_COLOURS, ColourRules, FeatureConfig
from pipeline.features.colour import (
    classify_colours,
    colour_constancy_gains,
    colour_presence,
    kmeans_palette,
    lab_planes,
)
from pipeline.features.segmentation import sampled_copy, segment, shape_features, working_copy

__all__ = [
    "ABCD_COLOURS",
    "ColourRules",
    "FeatureConfig",
    "DEFAULT_CONFIG",
    "feature_names",
    "image_features",
    "image_statistics",
    "features_for_file",
    "features_for_files",
    "sharpness",
    "stat_columns",
    "statistics_copy",
]

DEFAULT_CONFIG = FeatureConfig()

#: Feature groups (used by the report to lay out plots); every key of :func:`image_features`
#: except ``seg_ok``, ``seg_status`` and ``dominant_colour`` is numeric.
IMAGE_FEATURES: tuple[str, ...] = (
    "width",
    "height",
    "aspect_ratio",
    "brightness",
    "contrast_rms",
    "contrast_p5_95",
    "r_mean",
    "g_mean",
    "b_mean",
    "r_std",
    "g_std",
    "b_std",
    "lab_l_mean",
    "lab_a_mean",
    "lab_b_mean",
    "lab_l_std",
    "lab_a_std",
    "lab_b_std",
    "hsv_s_mean",
    "hsv_v_mean",
    "hsv_s_std",
    "hsv_v_std",
)
LESION_SHAPE_FEATURES: tuple[str, ...] = (
    "lesion_width_px",
    "lesion_height_px",
    "lesion_width_rel",
    "lesion_height_rel",
    "lesion_area_fraction",
    "lesion_aspect_ratio",
    "lesion_elongation",
    "border_compactness",
    "asymmetry",
    "lesion_centre_offset",
)
LESION_COLOUR_FEATURES: tuple[str, ...] = (
    "lesion_lab_l_mean",
    "lesion_lab_a_mean",
    "lesion_lab_b_mean",
    "lesion_lab_l_std",
    "lesion_lab_a_std",
    "lesion_lab_b_std",
    "lesion_r_mean",
    "lesion_g_mean",
    "lesion_b_mean",
    "skin_lab_l_mean",
    "lesion_skin_delta_e",
    "lesion_skin_contrast",
)


def colour_features(config: FeatureConfig = DEFAULT_CONFIG) -> tuple[str, ...]:
    names = config.colour_names
    return (*(f"colour_share_{n}" for n in names), *(f"colour_{n}" for n in names), "n_colours")


def palette_features(config: FeatureConfig = DEFAULT_CONFIG) -> tuple[str, ...]:
    return tuple(f"palette{i}_{part}" for i in range(config.palette_k) for part in ("l", "a", "b", "share"))


def lesion_features(config: FeatureConfig = DEFAULT_CONFIG) -> tuple[str, ...]:
    """Every feature that is NaN when the segmentation fails."""
    return LESION_SHAPE_FEATURES + LESION_COLOUR_FEATURES + colour_features(config) + palette_features(config)


def feature_names(config: FeatureConfig = DEFAULT_CONFIG) -> tuple[str, ...]:
    """The keys of :func:`image_features`, in order."""
    return IMAGE_FEATURES + ("seg_ok", "seg_status") + lesion_features(config) + ("dominant_colour",)


def _mean_std(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row mean and (population) std of float32 ``(c, n)`` planes (pairwise summation, centred)."""
    mean = planes.mean(axis=1)
    d = planes - mean[:, None]
    return mean.astype(np.float64), np.sqrt(np.einsum("ij,ij->i", d, d) / planes.shape[1]).astype(np.float64)


# rows of the stacked planes of image_features
_R, _G, _B, _L, _A, _BB, _S, _V, _Y = range(9)


def _pixel_planes(work: np.ndarray) -> np.ndarray:
    """(9, N) float32 planes of the sampled pixels: R G B in [0, 1], L* a* b*, HSV S V, luma Y'."""
    planes8 = np.ascontiguousarray(work.reshape(-1, 3).T)  # (3, N) uint8
    planes = np.empty((9, planes8.shape[1]), dtype=np.float32)  # see _R ... _Y
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
    return planes


def _image_level(planes: np.ndarray, width: int, height: int) -> dict[str, Any]:
    """Size, brightness, contrast and per-channel means/stds of the whole image."""
    n_px = planes.shape[1]
    cdf = np.cumsum(np.bincount((planes[_Y] * np.float32(255) + np.float32(0.5)).astype(np.int32), minlength=256))
    p5, p95 = np.searchsorted(cdf, [0.05 * n_px, 0.95 * n_px]) / 255.0
    mean, std = _mean_std(planes)
    out: dict[str, Any] = {
        "width": int(width),
        "height": int(height),
        "aspect_ratio": width / height,
        "brightness": float(mean[_Y]),
        "contrast_rms": float(std[_Y]),
        "contrast_p5_95": float(p95 - p5),
    }
    for name, row in (
        ("r", _R),
        ("g", _G),
        ("b", _B),
        ("lab_l", _L),
        ("lab_a", _A),
        ("lab_b", _BB),
        ("hsv_s", _S),
        ("hsv_v", _V),
    ):
        out[f"{name}_mean"], out[f"{name}_std"] = float(mean[row]), float(std[row])
    return {k: out[k] for k in IMAGE_FEATURES}


def _lesion_colour(planes: np.ndarray, mask: np.ndarray, fov: np.ndarray, contrast: float) -> dict[str, Any]:
    """CIELAB and RGB statistics of the lesion pixels, and how they differ from the skin's."""
    m = mask.reshape(-1)
    lesion = planes[: _BB + 1, m]  # (6, n): R G B L* a* b*
    skin_lab = planes[_L : _BB + 1, (fov & ~mask).reshape(-1)].mean(axis=1).astype(np.float64)
    lesion_mean, lesion_std = _mean_std(lesion)
    lm, ls, rgb = lesion_mean[_L : _BB + 1], lesion_std[_L : _BB + 1], lesion_mean[: _B + 1]
    return {
        "lesion_lab_l_mean": float(lm[0]),
        "lesion_lab_a_mean": float(lm[1]),
        "lesion_lab_b_mean": float(lm[2]),
        "lesion_lab_l_std": float(ls[0]),
        "lesion_lab_a_std": float(ls[1]),
        "lesion_lab_b_std": float(ls[2]),
        "lesion_r_mean": float(rgb[0]),
        "lesion_g_mean": float(rgb[1]),
        "lesion_b_mean": float(rgb[2]),
        "skin_lab_l_mean": float(skin_lab[0]),
        "lesion_skin_delta_e": float(np.sqrt(((lm - skin_lab) ** 2).sum())),
        "lesion_skin_contrast": contrast,
    }


def _abcd_colours(planes: np.ndarray, mask: np.ndarray, config: FeatureConfig) -> dict[str, Any]:
    """ABCD colour shares and presence, the palette and the dominant colour of the lesion, judged
    after white balance, so that a magenta or yellow cast of the camera does not turn every lesion
    red or brown."""
    lesion_rgb = planes[: _B + 1, mask.reshape(-1)]
    gains = colour_constancy_gains(planes[: _B + 1, ::4], config.colour_constancy_p)  # every 4th pixel
    balanced = np.minimum(lesion_rgb * gains[:, None], np.float32(1.0))
    bal_lab = lab_planes((balanced * np.float32(255) + np.float32(0.5)).astype(np.uint8))
    shares, present = colour_presence(bal_lab, config)
    out: dict[str, Any] = {}
    for name, share, pres in zip(config.colour_names, shares, present):
        out[f"colour_share_{name}"] = float(share)
        out[f"colour_{name}"] = float(pres)
    out["n_colours"] = float(present.sum())
    centres, pshares = kmeans_palette(
        np.ascontiguousarray(bal_lab.T), config.palette_k, config.palette_iters, config.palette_samples
    )
    for i, (c, s) in enumerate(zip(centres, pshares)):
        out[f"palette{i}_l"], out[f"palette{i}_a"], out[f"palette{i}_b"] = (float(v) for v in c)
        out[f"palette{i}_share"] = float(s)
    dominant = int(classify_colours(centres[:1].T, config.colour_rules)[0])
    out["dominant_colour"] = ABCD_COLOURS[dominant] if dominant >= 0 else "other"
    return out


def image_features(
    rgb: np.ndarray, config: FeatureConfig = DEFAULT_CONFIG, size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The statistics of one ``(H, W, 3)`` uint8 RGB image as a flat dict (keys: :func:`feature_names`).
    ``size``: ``(width, height)`` of the image ``rgb`` was reduced from (:func:`statistics_copy`);
    sizes are reported in its pixels.

    Never raises for a valid array; when the segmentation fails, ``seg_ok`` is False,
    ``seg_status`` says why, the lesion features are NaN and ``dominant_colour`` is "".
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2] if size is None else (int(size[1]), int(size[0]))
    work = sampled_copy(rgb, config)
    h, w = work.shape[:2]
    planes = _pixel_planes(work)
    out = _image_level(planes, width, height)
    seg = segment(work, config, planes[_L].reshape(h, w))
    out["seg_ok"], out["seg_status"] = seg.ok, seg.status
    if not seg.ok:
        out.update({name: float("nan") for name in lesion_features(config)})
        out["dominant_colour"] = ""
        return out
    hs, ws = seg.mask.shape
    out.update(shape_features(seg.mask, width / ws, height / hs))
    mask, fov = seg.upsampled(h, w)
    out.update(_lesion_colour(planes, mask, fov, seg.contrast))
    out.update(_abcd_colours(planes, mask, config))
    return out


def features_for_file(path: Path | str, config: FeatureConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Decode ``path`` (via :func:`pipeline.core.images.decode_rgb`) and return its features with
    ``image_id`` (the file stem) first. Raises :class:`pipeline.core.images.ImageError` naming the file."""
    path = Path(path)
    return {"image_id": path.stem, **image_features(decode_rgb(path, str(path)), config)}


def features_for_files(paths: list[Path | str] | tuple, config: FeatureConfig = DEFAULT_CONFIG) -> list[dict[str, Any]]:
    """:func:`features_for_file` over a chunk of files (the unit of work of the parallel runners)."""
    return [features_for_file(p, config) for p in paths]


# ----------------------------------------------------------------------------------------------
# the statistics monitoring compares: the features plus sharpness

SHARPNESS = "sharpness"
#: Categorical statistics (the rest are numbers).
STAT_CATEGORICAL: tuple[str, ...] = ("seg_status", "dominant_colour")


def sharpness(rgb: np.ndarray, config: FeatureConfig = DEFAULT_CONFIG) -> float:
    """Mean absolute Laplacian of the luma (in [0, 1] units) on the same working copy as the
    statistics (longer side ``config.working_max_side``): falls sharply with blur or upscaling."""
    work = working_copy(np.asarray(rgb, dtype=np.uint8), config.working_max_side).astype(np.float32)
    luma = (work[..., 0] * 0.299 + work[..., 1] * 0.587 + work[..., 2] * 0.114) / 255.0
    return float(np.abs(ndimage.laplace(luma, mode="reflect")).mean())


def image_statistics(
    rgb: np.ndarray, config: FeatureConfig | None = None, size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """:func:`image_features` of ``rgb`` plus :func:`sharpness`: what drift monitoring (the
    reference profile, a folder check, the service's inference log) records per image. ``rgb`` may
    be the image's :func:`statistics_copy` with ``size`` its ``(width, height)``: the same result."""
    config = config or DEFAULT_CONFIG
    return {**image_features(rgb, config, size), SHARPNESS: sharpness(rgb, config)}


def statistics_copy(rgb: np.ndarray, config: FeatureConfig | None = None) -> np.ndarray:
    """The only pixels :func:`image_statistics` reads: the working copy (longer side at most
    ``config.working_max_side``, 200 px by default). The service sends this small copy, not the
    decoded image, to the log's writer: ``image_statistics(statistics_copy(rgb), size=(w, h))``
    equals ``image_statistics(rgb)``."""
    return working_copy(np.asarray(rgb, dtype=np.uint8), (config or DEFAULT_CONFIG).working_max_side)


def stat_columns(config: FeatureConfig | None = None) -> tuple[list[str], list[str]]:
    """(numerical, categorical) columns of :func:`image_statistics`."""
    names = [n for n in feature_names(config or DEFAULT_CONFIG) if n != "seg_ok"]
    cat = [n for n in names if n in STAT_CATEGORICAL]
    return [n for n in names if n not in STAT_CATEGORICAL] + [SHARPNESS], cat
