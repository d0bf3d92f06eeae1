"""Near-duplicates: copies of one image (resized, re-compressed, slightly cropped, colour-shifted).

A perceptual hash is not discriminative on dermoscopy (every image is a dark blob on skin, often in
the same circular field of view), so the method is two-staged and every threshold was chosen by
measurement (``benchmarks/near_duplicates.py``, on true copies made from real images and on the
distinct-lesion pairs of HAM10000):

1. **candidates**: each image is a :data:`THUMB` x :data:`THUMB` greyscale thumbnail
   (:func:`thumbnail`); its coarse shape, a standardised :data:`COARSE` x :data:`COARSE` view of the
   whole image and of its centre crops (:data:`SCALES`: a crop of a few percent on each side), is
   compared with every other image's by one matrix product; each image keeps its
   :data:`CANDIDATES` most similar images above ``min_coarse``;
2. **confirmation**: for a candidate pair the fine detail that tells two lesions apart (hair, skin
   texture, pigment network: the thumbnail minus its blur, standardised, without its border) must
   correlate above ``min_detail`` at the best pair of crops. Distinct lesions with the same blob shape agree
   coarsely but not in detail; a copy agrees in both.

Colour shifts drop out because only standardised greyscale is compared; resizing and
re-compression because both are compared at low resolution. Copies cropped off-centre by more than
a few percent are not found (the crops are centred).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from pipeline.core.sheets import contact_grid

#: Side of the greyscale thumbnail every comparison starts from.
THUMB = 64
#: Side of the coarse view compared in the candidate stage.
COARSE = 12
#: Side of the detail view compared in the confirmation stage.
DETAIL = 32
#: Centre crops (share of the side kept) compared in both stages: the whole image and a crop.
SCALES = (1.0, 0.94, 0.88)
#: Candidates kept per image for confirmation.
CANDIDATES = 3
#: Blur (pixels of the detail view) removed to leave the detail.
DETAIL_SIGMA = 1.0
#: Border (pixels of the detail view) left out of the detail comparison.
DETAIL_MARGIN = 4
#: Thresholds measured by benchmarks/near_duplicates.py: true copies scored 0.87 in detail at the
#: least (a 2/3-size JPEG-50 copy), the most alike distinct lesions of HAM10000 0.85 at the most.
MIN_COARSE = 0.93
MIN_DETAIL = 0.86


@dataclass(frozen=True)
class Pair:
    """Two images judged copies of one another, with their coarse and detail similarity."""

    a: str
    b: str
    coarse: float
    detail: float


def thumbnail(img: Image.Image) -> np.ndarray:
    """The ``THUMB x THUMB`` uint8 greyscale thumbnail every comparison uses (aspect not kept:
    copies share the original's aspect up to a slight crop)."""
    return np.asarray(img.convert("L").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8)


def file_thumbnail(data: bytes | str | Path) -> np.ndarray:
    """:func:`thumbnail` of an image file (a path or its bytes), decoded at a reduced scale where
    the format allows it (JPEG: a DCT draft of at least twice the thumbnail's side)."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        img.draft("RGB", (THUMB * 2, THUMB * 2))
        return thumbnail(img)


def _crop(thumbs: np.ndarray, scale: float, side: int) -> np.ndarray:
    """Centre crop keeping ``scale`` of each side, resized to ``side`` (a stack of thumbnails)."""
    n = thumbs.shape[-1]
    c = int(round(n * (1 - scale) / 2))
    arr = thumbs[:, c : n - c, c : n - c] if c else thumbs
    k = arr.shape[-1]
    # area resize by a separable linear map: exact, and vectorised over the stack
    m = _resize_matrix(k, side)
    return m @ arr.astype(np.float32) @ m.T


def _resize_matrix(n: int, side: int) -> np.ndarray:
    """Row-stochastic matrix averaging ``n`` pixels into ``side`` bins (area interpolation)."""
    edges = np.linspace(0, n, side + 1)
    m = np.zeros((side, n), np.float32)
    for i in range(side):
        lo, hi = edges[i], edges[i + 1]
        for j in range(int(np.floor(lo)), int(np.ceil(hi))):
            m[i, j] = min(hi, j + 1) - max(lo, j)
    return m / m.sum(1, keepdims=True)


def _standardise(views: np.ndarray) -> np.ndarray:
    flat = views.reshape(len(views), -1)
    flat = flat - flat.mean(1, keepdims=True)
    return flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6)


def coarse_views(thumbs: np.ndarray) -> np.ndarray:
    """``(n, len(SCALES), COARSE*COARSE)`` standardised coarse views of a thumbnail stack."""
    return np.stack([_standardise(_crop(thumbs, s, COARSE)) for s in SCALES], axis=1)


def detail_views(thumbs: np.ndarray) -> np.ndarray:
    """``(n, len(SCALES), (DETAIL - 2*DETAIL_MARGIN)**2)`` standardised detail views: each view
    minus its blur, without its border (where the dermoscope's circular field edge would make two
    different lesions look alike)."""
    out = []
    m = DETAIL_MARGIN
    for s in SCALES:
        v = _crop(thumbs, s, DETAIL)
        v = v - ndimage.gaussian_filter(v, (0, DETAIL_SIGMA, DETAIL_SIGMA))
        out.append(_standardise(v[:, m:-m, m:-m]))
    return np.stack(out, axis=1)


def _best(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Max over crop pairs of the dot products between views: ``(len(q), len(r))``."""
    best = None
    for u in range(q.shape[1]):
        for v in range(r.shape[1]):
            if u and v:  # cropping both sides equally is the uncropped comparison again
                continue
            s = q[:, u] @ r[:, v].T
            best = s if best is None else np.maximum(best, s)
    return best


def find_pairs(
    thumbs: np.ndarray,
    ids: Sequence[str],
    *,
    reference: np.ndarray | None = None,
    reference_ids: Sequence[str] | None = None,
    min_coarse: float = MIN_COARSE,
    min_detail: float = MIN_DETAIL,
    block: int = 1024,
) -> list[Pair]:
    """Near-duplicate pairs among ``thumbs`` (``reference`` None) or between ``thumbs`` and
    ``reference`` (new images against existing ones), sorted by detail similarity, strongest
    first. Pairs within ``thumbs`` are reported once (``a < b``)."""
    if len(thumbs) == 0:
        return []
    within = reference is None
    ref, ref_ids = (thumbs, ids) if within else (reference, reference_ids)
    if ref is None or len(ref) == 0 or ref_ids is None:
        return []
    qc, rc = coarse_views(thumbs), coarse_views(ref)
    cand: set[tuple[int, int]] = set()
    k = min(CANDIDATES, len(ref) - (1 if within else 0))
    if k <= 0:
        return []
    for start in range(0, len(thumbs), block):
        sim = _best(qc[start : start + block], rc)
        if within:
            sim[np.arange(sim.shape[0]), np.arange(start, start + sim.shape[0])] = -1.0
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        for i, row in enumerate(top):
            for j in row:
                if sim[i, j] >= min_coarse:
                    a, b = start + i, int(j)
                    cand.add((min(a, b), max(a, b)) if within else (a, b))
    if not cand:
        return []
    idx = np.array(sorted(cand))
    a, b = idx[:, 0], idx[:, 1]
    coarse = _paired_best(qc[a], rc[b])
    qd = detail_views(thumbs)
    detail = _paired_best(qd[a], (qd if within else detail_views(ref))[b])
    keep = np.flatnonzero(detail >= min_detail)
    pairs = [
        Pair(str(ids[a[k]]), str(ref_ids[b[k]]), round(float(coarse[k]), 4), round(float(detail[k]), 4)) for k in keep
    ]
    return sorted(pairs, key=lambda p: (-p.detail, p.a, p.b))


def _paired_best(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Like :func:`_best` for row ``i`` of ``q`` against row ``i`` of ``r`` only."""
    best = np.full(len(q), -1.0, np.float32)
    for u in range(q.shape[1]):
        for v in range(r.shape[1]):
            if u and v:
                continue
            best = np.maximum(best, np.einsum("nd,nd->n", q[:, u], r[:, v]))
    return best


def groups(pairs: Sequence[Pair]) -> dict[str, str]:
    """Each image of a pair -> the first image_id (sorted) of its connected group of copies."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = root(p.a), root(p.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: root(x) for x in parent}


def contact_sheet(
    pairs: Sequence[Pair], path_of: Mapping[str, Path], out: Path, caption: Mapping[str, str], limit: int = 40
) -> Path:
    """A PNG of the pairs side by side (first ``limit``), each image captioned (id, lesion,
    diagnosis) and each pair with its detail similarity, for a person to look at."""
    shown = list(pairs)[:limit]
    rows = [[(path_of[i], caption.get(i, i)) for i in (p.a, p.b)] for p in shown]
    return contact_grid(rows, out, row_notes=[f"{p.detail:.2f}" for p in shown])
