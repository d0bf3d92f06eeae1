"""The fast data path: decode once into a uint8 tensor cache, augment in batches on the device.

JPEG decoding is the bottleneck of a classic ``DataLoader`` pipeline (a GPU trains
EfficientNet-Lite0 at several thousand images/s; a CPU core decodes a few hundred). lesionflow
decodes every image exactly once, at training resolution, with :func:`pipeline.images.decode_rgb`
(:func:`load_images`), keeps the result as one ``(N, 3, H, W)`` uint8 tensor (about 0.9 GB for
10k images at 240x320) cached on disk under ``artifacts/cache/`` - keyed by the data version, the
resolution and the image list, so a new data version or resolution never reads a stale cache -
and holds it in memory: pinned on a CUDA machine, or directly on the GPU (:class:`ImageBank`).

Augmentation (:class:`GpuAugment`) then runs on whole batches on the device: one random affine
per image (flips, free rotation over 360 degrees, which includes the 90-degree ones, scale and a
small shift, sampled with reflection padding so that no black corners appear), and colour jitter
(brightness, contrast, saturation, hue rotation in YIQ space) - the augmentations that suit
dermoscopy, where a lesion has no canonical orientation and colour varies with the device.

The same :func:`fit_to_size` is used by :mod:`pipeline.inference`, so training and serving see
identically resized pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import images
from pipeline.fsutil import atomic_write_bytes, atomic_write_text

CACHE_VERSION = 1


def fit_to_size(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (height, width, 3).

    A portrait image given to a landscape model (or the reverse) is first turned by 90 degrees, so
    that the lesion is not squashed: dermoscopic images have no canonical orientation.
    """
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    h, w = arr.shape[:2]
    if (h > w) != (height > width) and h != w and height != width:
        arr = np.ascontiguousarray(np.rot90(arr))
    return images.resize_rgb(arr, height, width)


def _decode_one(path: Path, height: int, width: int) -> np.ndarray:
    arr = images.decode_rgb(path, str(path))
    return fit_to_size(arr, height, width)


def load_images(
    paths: Sequence[Path | str],
    height: int,
    width: int,
    workers: int = 0,
    progress: bool = True,
    desc: str = "decode",
) -> np.ndarray:
    """Decode and resize ``paths`` into an (N, 3, height, width) uint8 array (threads: PIL releases
    the GIL while decoding). A bad image raises :class:`pipeline.images.ImageError` naming it."""
    paths = [Path(p) for p in paths]
    out = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    workers = workers or min(32, os.cpu_count() or 1)

    def work(i: int) -> int:
        out[i] = _decode_one(paths[i], height, width).transpose(2, 0, 1)
        return i

    iterator: Iterable = range(len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(work, iterator)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc=desc, unit="img", leave=False)
        for _ in results:
            pass
    return out


def cache_key(data_md5: str, image_paths: Sequence[Path | str], height: int, width: int) -> str:
    """Key of a cache file: data version + resolution + the images (names and sizes)."""
    h = hashlib.sha1()
    h.update(f"v{CACHE_VERSION}|{data_md5}|{height}x{width}".encode())
    for p in image_paths:
        p = Path(p)
        size = p.stat().st_size if p.exists() else -1
        h.update(f"|{p.name}:{size}".encode())
    tag = (data_md5 or "unknown").replace(".dir", "")[:12]
    return f"{tag}_{height}x{width}_{h.hexdigest()[:12]}"


def cached_images(
    image_paths: Sequence[Path | str],
    height: int,
    width: int,
    cache_dir: Path | str | None,
    data_md5: str = "unknown",
    workers: int = 0,
    progress: bool = True,
    desc: str = "decode",
) -> np.ndarray:
    """(N, 3, H, W) uint8 images, from the on-disk cache when it has them, else decoded (and
    cached). ``cache_dir=None`` disables the disk cache."""
    if cache_dir is None:
        return load_images(image_paths, height, width, workers, progress, desc)
    cache_dir = Path(cache_dir)
    key = cache_key(data_md5, image_paths, height, width)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    names = [Path(p).name for p in image_paths]
    if npy.exists() and meta.exists():
        try:
            info = json.loads(meta.read_text())
            if info.get("names") == names and info.get("shape") == [len(names), 3, height, width]:
                arr = np.load(npy)
                if arr.shape == (len(names), 3, height, width) and arr.dtype == np.uint8:
                    return arr
        except (OSError, ValueError):
            pass  # unreadable cache: rebuild it
    arr = load_images(image_paths, height, width, workers, progress, desc)
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(npy, buf.getvalue())
    atomic_write_text(meta, json.dumps({"names": names, "shape": list(arr.shape), "data_md5": data_md5}))
    return arr


@dataclass
class ImageBank:
    """Images (uint8, N x 3 x H x W), labels and metadata held where the training runs.

    On CUDA the whole bank lives on the GPU (10k images at 240x320 are 2.3 GB), so a batch is one
    index operation; on CPU it is a plain tensor (pinned when ``pin``)."""

    images: torch.Tensor
    labels: torch.Tensor
    metadata: torch.Tensor | None = None

    @classmethod
    def create(
        cls, images_u8: np.ndarray, labels: np.ndarray, metadata: np.ndarray | None,
        device: torch.device, pin: bool = False,
    ) -> "ImageBank":
        x = torch.from_numpy(np.ascontiguousarray(images_u8))
        y = torch.as_tensor(labels, dtype=torch.long)
        m = torch.as_tensor(metadata, dtype=torch.float32) if metadata is not None else None
        if device.type == "cuda":
            x, y = x.to(device), y.to(device)
            m = m.to(device) if m is not None else None
        elif pin and torch.cuda.is_available():
            x = x.pin_memory()
        return cls(x, y, m)

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor):
        idx = idx.to(self.images.device)
        m = self.metadata[idx] if self.metadata is not None else None
        return self.images[idx], self.labels[idx], m


def pad_order(order: torch.Tensor, world: int) -> torch.Tensor:
    """Wrap an epoch's sample order to a multiple of ``world`` (as DistributedSampler does), so that
    every rank gets the same number of samples."""
    n = order.numel()
    total = int(math.ceil(n / world)) * world
    return torch.cat([order, order[: total - n]]) if total > n else order


def rank_batches(order: torch.Tensor, batch_size: int, rank: int, world: int):
    """Yield ``(global_batch_positions, local_indices)`` for rank ``rank``: global batch ``b`` is
    ``order[b*B:(b+1)*B]`` and each rank takes every ``world``-th element of it, so the ranks'
    shards are disjoint and together are exactly what one process would train on."""
    order = pad_order(order, world)
    for s in range(0, order.numel(), batch_size):
        g = order[s : s + batch_size]
        yield g, g[rank::world]


# ----------------------------------------------------------------------------------------------
# augmentation on the device, in batches


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rotate_degrees: float = 180.0  # uniform in [-d, d]; 180 covers the 90-degree rotations
    scale: tuple[float, float] = (0.9, 1.15)  # zoom factor (>1 zooms in)
    translate: float = 0.05  # fraction of the image size
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03  # fraction of a full turn


# RGB <-> YIQ: a hue rotation is a rotation of the (I, Q) plane.
_RGB2YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]]
)
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


class GpuAugment:
    """Batched augmentation + normalisation of uint8 batches, on whatever device they live.

    Random parameters come from a seeded generator; :meth:`params` draws them for a whole *global*
    batch, so that data-parallel ranks (each taking a slice) augment exactly as one process would.
    """

    def __init__(self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float]):
        self.cfg = cfg
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def params(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 9) random numbers in [0, 1) (drawn on the CPU generator: identical on all ranks)."""
        return torch.rand(n, 9, generator=generator)

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, x_u8: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """Augment (if ``u`` is given: (B, 9) uniforms from :meth:`params`) and normalise."""
        x = x_u8.float().div_(255.0)
        if u is not None:
            u = u.to(x.device)
            x = self._geometry(x, u)
            x = self._colour(x, u)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _geometry(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        b, _, h, w = x.shape
        angle = (u[:, 0] * 2 - 1) * math.radians(c.rotate_degrees)
        lo, hi = c.scale
        zoom = lo + (hi - lo) * u[:, 1]
        sx = torch.where((u[:, 2] < 0.5) & c.hflip, -1.0, 1.0)
        sy = torch.where((u[:, 3] < 0.5) & c.vflip, -1.0, 1.0)
        tx = (u[:, 4] * 2 - 1) * c.translate * 2  # normalised coords span 2
        ty = (u[:, 5] * 2 - 1) * c.translate * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # rotation in pixel space expressed in normalised coords (aspect ratio a = w / h)
        a = w / h
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0] = cos * sx
        theta[:, 0, 1] = -sin * sy / a
        theta[:, 1, 0] = sin * sx * a
        theta[:, 1, 1] = cos * sy
        theta[:, 0, 2] = tx
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _colour(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        b = x.shape[0]
        bright = 1 + (u[:, 6] * 2 - 1) * c.brightness
        contrast = 1 + (u[:, 7] * 2 - 1) * c.contrast
        # saturation and hue share one uniform (folded) to keep 9 numbers per image
        sat = 1 + ((u[:, 8] * 4) % 2 - 1) * c.saturation
        hue = (u[:, 8] * 2 - 1) * c.hue * 2 * math.pi
        x = x * bright.view(b, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast.view(b, 1, 1, 1) + mean
        # saturation + hue as one 3x3 colour matrix per image, in YIQ space
        cos, sin = torch.cos(hue), torch.sin(hue)
        m = torch.zeros(b, 3, 3, device=x.device)
        m[:, 0, 0] = 1
        m[:, 1, 1] = cos * sat
        m[:, 1, 2] = -sin * sat
        m[:, 2, 1] = sin * sat
        m[:, 2, 2] = cos * sat
        mat = _YIQ2RGB.to(x.device) @ m @ _RGB2YIQ.to(x.device)
        x = torch.einsum("bij,bjhw->bihw", mat, x)
        return x.clamp_(0.0, 1.0)
