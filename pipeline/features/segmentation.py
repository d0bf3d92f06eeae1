"""Classical lesion segmentation of a dermoscopic image, and the lesion's shape.

:func:`segment` works on the L* plane of a working copy (block-averaged to a longer side of
``segment_max_side``): grey closing (removes thin dark hair) -> Gaussian smoothing -> dark vignette
corners (dark regions connected to a corner and lying almost entirely outside the central
ellipse, grown by ``vignette_margin`` pixels) excluded from the field of view -> Otsu threshold
within the field of view -> connected components of the dark side -> the component with the
largest centre-weighted area (pixel weight ``1 - r``; a component that touches the frame and lies
mostly at r >= 0.6 - shading or a vignette's soft edge - has its score divided by 20) -> holes
filled. It fails (a :class:`Segmentation` with a ``status``) but never raises: ``flat``,
``empty``, ``too_small``, ``too_large`` (no skin left to compare with) or ``low_contrast`` (the
lesion is not ``min_contrast`` L* units darker than the skin). :func:`shape_features` measures the
mask: size, elongation, border compactness ``4*pi*A/P**2`` and mirror asymmetry.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from scipy import ndimage

from pipeline.core.images import working_copy
from pipeline.core.params import FeatureConfig
from pipeline.features.colour import lab_planes


def sampled_copy(rgb: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """The pixels the statistics are computed on: every ``pixel_stride``-th pixel of the working copy."""
    work = working_copy(rgb, config.working_max_side)
    s = config.pixel_stride
    return np.ascontiguousarray(work[::s, ::s]) if s > 1 else work


def lesion_mask(rgb: np.ndarray, config: FeatureConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """(working copy, lesion mask at the working copy's size, seg_status) exactly as
    :func:`image_features` segments ``rgb`` (for drawing contours)."""
    work = working_copy(rgb, config.working_max_side)
    sampled = sampled_copy(rgb, config)
    seg = segment(sampled, config)
    shape = work.shape[:2]
    mask = _upsample(seg.mask, seg.factor * config.pixel_stride, *shape) if seg.ok else np.zeros(shape, bool)
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


def segmentation_factor(h: int, w: int, config: FeatureConfig) -> int:
    """How many times coarser than the working copy the segmentation grid is."""
    return max(1, math.ceil(max(h, w) / config.segment_max_side))


def _prepared_lightness(
    work: np.ndarray, config: FeatureConfig, lightness: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """(smoothed L* plane on the segmentation grid, its factor): block mean, hair closing, blur."""
    h, w = work.shape[:2]
    if lightness is None:
        lightness = lab_planes(np.ascontiguousarray(work.reshape(-1, 3).T))[0].reshape(h, w)
    factor = segmentation_factor(h, w, config)
    light = block_mean(lightness, factor)
    if light is lightness and factor > 1:
        factor = 1
    if config.hair_kernel > 1:
        light = ndimage.grey_closing(light, size=(config.hair_kernel, config.hair_kernel))
    if config.smooth_sigma > 0:
        light = ndimage.gaussian_filter(light, config.smooth_sigma)
    return light, factor


def _field_of_view(light: np.ndarray, radius: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Everything but dark vignette corners: dark regions touching a corner and lying almost
    entirely off-centre, grown by ``vignette_margin`` (their soft edge is not lesion)."""
    hs, ws = light.shape
    fov = np.ones((hs, ws), dtype=bool)
    dark = light < config.vignette_max_l
    if not (dark[0, 0] or dark[0, -1] or dark[-1, 0] or dark[-1, -1]):
        return fov
    labels, _ = ndimage.label(dark)
    corners = ((0, 0), (0, ws - 1), (hs - 1, 0), (hs - 1, ws - 1))
    ids = np.array(sorted({int(labels[y, x]) for y, x in corners} - {0}))
    flat = labels.ravel()
    inner = np.bincount(flat, weights=(radius < 0.6).ravel())[ids]
    size = np.bincount(flat)[ids]
    vignette = ids[inner <= 0.05 * size]
    if len(vignette):
        fov = ~ndimage.binary_dilation(np.isin(labels, vignette), iterations=config.vignette_margin)
    return fov


def _lesion_component(labels: np.ndarray, n: int, weight: np.ndarray, radius: np.ndarray) -> np.ndarray | None:
    """The dark component with the largest centre-weighted area (None when none scores). One lying
    mostly in the periphery and touching the frame is shading or a vignette's soft edge rather than
    the lesion: it only wins when nothing central is there."""
    hs, ws = labels.shape
    flat = labels.ravel()
    scores = np.bincount(flat, weights=weight.ravel(), minlength=n + 1)[1:]
    size = np.bincount(flat, minlength=n + 1)[1:]
    peripheral = np.bincount(flat, weights=(radius >= 0.6).ravel(), minlength=n + 1)[1:] / size
    touches = np.bincount(labels[_frame(hs, ws)], minlength=n + 1)[1:] > 0
    scores = np.where(touches & (peripheral > 0.7), scores * 0.05, scores)
    best = int(np.argmax(scores)) + 1
    return None if scores[best - 1] <= 0 else fill_holes(labels == best)


def segment(work: np.ndarray, config: FeatureConfig, lightness: np.ndarray | None = None) -> Segmentation:
    """Segment the lesion of a working-size RGB image (see the module docstring). Never raises.

    ``lightness``: the image's L* plane ``(h, w)`` when already computed.
    """
    light, factor = _prepared_lightness(work, config, lightness)
    hs, ws = light.shape
    weight, radius = _centre_weight(hs, ws)
    empty = np.zeros((hs, ws), dtype=bool)
    fov = _field_of_view(light, radius, config)
    if np.count_nonzero(fov) < 0.2 * hs * ws:
        return Segmentation(empty, fov, "flat", factor)
    t = otsu_threshold(light[fov])
    if t is None:
        return Segmentation(empty, fov, "flat", factor)
    labels, n = ndimage.label((light <= t) & fov)
    mask = _lesion_component(labels, n, weight, radius) if n else None
    if mask is None:
        return Segmentation(empty, fov, "empty", factor)
    area = np.count_nonzero(mask) / (hs * ws)
    skin = fov & ~mask
    if area < config.min_area_fraction:
        return Segmentation(empty, fov, "too_small", factor)
    if area > config.max_area_fraction or np.count_nonzero(skin) < 0.02 * hs * ws:
        return Segmentation(empty, fov, "too_large", factor)
    contrast = float(light[skin].mean() - light[mask].mean())
    if contrast < config.min_contrast:
        return Segmentation(empty, fov, "low_contrast", factor, contrast)
    return Segmentation(mask, fov, "ok", factor, contrast)


Axis = tuple[float, float]


def _principal_axes(dx: np.ndarray, dy: np.ndarray) -> tuple[float, Axis, Axis]:
    """Elongation and the major and minor axes of pixel offsets from the centroid: the eigenvectors
    of the 2x2 second-moment matrix [[sxx, sxy], [sxy, syy]], in closed form."""
    sxx, syy, sxy = float(dx @ dx) / len(dx), float(dy @ dy) / len(dy), float(dx @ dy) / len(dx)
    half_diff = (sxx - syy) / 2
    root = math.hypot(half_diff, sxy)
    lam_major, lam_minor = (sxx + syy) / 2 + root, (sxx + syy) / 2 - root
    theta = 0.5 * math.atan2(2 * sxy, sxx - syy)
    major = (math.cos(theta), math.sin(theta))
    minor = (-math.sin(theta), math.cos(theta))
    # + 1/12: the variance of a pixel's own extent, so a one-pixel-wide line stays finite
    return math.sqrt((lam_major + 1 / 12) / (lam_minor + 1 / 12)), major, minor


def _mirror_asymmetry(
    mask: np.ndarray, centre: tuple[float, float], dx: np.ndarray, dy: np.ndarray, major: Axis, minor: Axis
) -> float:
    """Mean share of the lesion's pixels whose mirror image across the major axis, then across the
    minor axis, falls outside the lesion."""
    h, w = mask.shape
    cx, cy = centre
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
    return float(np.mean(asym))


def shape_features(mask: np.ndarray, scale_x: float, scale_y: float) -> dict[str, float]:
    """Size, elongation, border compactness, asymmetry and centre offset of a lesion mask (pixel
    sizes scaled by ``scale_x``/``scale_y`` back to the original image)."""
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
    elongation, major, minor = _principal_axes(dx, dy)
    asymmetry = _mirror_asymmetry(mask, (cx, cy), dx, dy, major, minor)
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
        "asymmetry": asymmetry,
        "lesion_centre_offset": offset,
    }
