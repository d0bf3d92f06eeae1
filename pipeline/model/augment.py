"""Augmentation on the device, in batches, and the test-time flip views.

:class:`GpuAugment` augments whole uint8 batches wherever they live (on the GPU next to the model,
or on the CPU): one random affine per image (flips, free rotation over 360 degrees, which includes
the 90-degree ones, zoom and a small shift, sampled with reflection padding so that no black corners
appear) and colour jitter (brightness, contrast, saturation and hue as one YIQ matrix) - the
augmentations that suit dermoscopy, where a lesion has no canonical orientation and colour varies
with the device. Its random numbers are drawn for a whole *global* batch, so data-parallel ranks
(each taking a slice) augment exactly as one process would. The knobs are
:class:`pipeline.core.params.AugmentParams`.

:func:`flip_views` is the one definition of test-time augmentation (training's final validation
and every prediction): the image and its three flips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.core.params import AugmentParams

#: Names of the test-time views, in :func:`flip_views` order.
TTA_VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip", "hvflip")


def flip_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The four test-time views of an (N, C, H, W) batch: itself, flipped left-right, up-down, both."""
    return [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]


# RGB <-> YIQ: a hue rotation is a rotation of the (I, Q) plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


class GpuAugment:
    """Batched augmentation + normalisation of uint8 batches, on whatever device they live.

    Random parameters come from a seeded generator; :meth:`params` draws them for a whole *global*
    batch, so that data-parallel ranks (each taking a slice) augment exactly as one process would.
    """

    def __init__(self, cfg: AugmentParams, mean: Sequence[float], std: Sequence[float]):
        self.cfg = cfg
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def params(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 9) random numbers in [0, 1) (drawn on the CPU generator: identical on all ranks)."""
        return torch.rand(n, 9, generator=generator)

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 -> float, normalised with the backbone's mean/std (no augmentation)."""
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
