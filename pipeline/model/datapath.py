"""The fast data path: decode once into a uint8 tensor cache held where the training runs.

JPEG decoding is the bottleneck of a classic ``DataLoader`` pipeline (a GPU trains
EfficientNet-Lite0 at several thousand images/s; a CPU core decodes a few hundred). lesionflow
decodes every image exactly once, at training resolution, with :func:`pipeline.core.images.decode_rgb`
(:func:`load_images`), keeps the result as one ``(N, 3, H, W)`` uint8 tensor (about 0.9 GB for
10k images at 240x320) cached on disk under ``artifacts/cache/`` - keyed by the data version, the
resolution and the image list, so a new data version or resolution never reads a stale cache -
and holds it in memory: pinned on a CUDA machine, or directly on the GPU (:class:`ImageBank`).

Augmentation then runs on whole batches on the device (:mod:`pipeline.model.augment`).
:func:`rank_batches` gives each data-parallel rank its disjoint shard of every global batch.

The resize is :func:`pipeline.core.images.fit_to_size`, the one every prediction uses too, so
training and serving see identically resized pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core import images
from pipeline.core.fsutil import atomic_write_bytes, atomic_write_text
from pipeline.core.images import fit_to_size

CACHE_VERSION = 1


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
    the GIL while decoding). A bad image raises :class:`pipeline.core.images.ImageError` naming it."""
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
        cls,
        images_u8: np.ndarray,
        labels: np.ndarray,
        metadata: np.ndarray | None,
        device: torch.device,
        pin: bool = False,
    ) -> ImageBank:
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
