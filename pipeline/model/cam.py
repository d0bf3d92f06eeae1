"""Class activation maps as a person sees them: the heatmap at the image's own size and its overlay.

For a classifier whose head is global average pooling followed by a linear layer (every backbone
here whose pooled vector reaches the head unchanged), Grad-CAM of the last feature map ``A`` for
class ``c`` is exactly CAM (Zhou et al., CVPR 2016): the gradient of the logit
``y_c = sum_k w_ck mean_ij A_k(i, j) + ...`` with respect to ``A_k(i, j)`` is ``w_ck / (h w)``
everywhere, so Grad-CAM's channel weights are the head's weights up to a constant, and the
min-max normalisation removes the constant. The packaged ONNX graph outputs ``sum_k w_ck A_k`` for
every class (:mod:`pipeline.model.onnx`), so the service explains an image without torch;
:func:`pipeline.model.explain.gradcam` (autograd, the ``grad-cam`` package) gives the same map,
which the tests check.

:func:`heatmap` turns a map at the feature map's resolution into the (H, W) heatmap in [0, 1] at
the image's size exactly as ``grad-cam`` does (ReLU, min-max, bilinear to the model's input, then
undoing :func:`pipeline.core.images.fit_to_size`'s quarter turn); :func:`to_image_size` is the part
both share; :func:`overlay` blends a heatmap over the image in the jet colour map. NumPy and Pillow
only.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.core.images import is_turned

__all__ = ["heatmap", "overlay", "to_image_size"]

#: matplotlib's ``jet`` (its segment data), sampled at 256 levels like its colormap lookup table.
_JET_SEGMENTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
_LEVELS = np.linspace(0.0, 1.0, 256)
JET = np.stack([np.interp(_LEVELS, *zip(*_JET_SEGMENTS[c])) for c in ("red", "green", "blue")], axis=1)


def _resize(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    if heat.shape == (height, width):
        return heat
    return np.asarray(Image.fromarray(heat, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def to_image_size(heat: np.ndarray, image_hw: tuple[int, int], input_size: tuple[int, int] | None) -> np.ndarray:
    """A heatmap at the model's input size brought to the image's (H, W): the quarter turn
    :func:`~pipeline.core.images.fit_to_size` gave a portrait image undone, bilinear resize, NaN
    and infinities replaced, values clipped to [0, 1]; float32."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if input_size is not None and is_turned(image_hw, input_size):
        heat = np.ascontiguousarray(np.rot90(heat, k=-1))
    return np.clip(_resize(heat, *image_hw), 0.0, 1.0)


def _min_max(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    return a / (1e-7 + a.max())


def heatmap(activation: np.ndarray, image_hw: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """The (H, W) heatmap in [0, 1] of one class's activation map (``sum_k w_ck A_k`` at the feature
    map's resolution): ReLU, min-max, bilinear to ``input_size``, min-max again (as ``grad-cam``
    does), then :func:`to_image_size`."""
    cam = _min_max(np.maximum(np.asarray(activation, dtype=np.float32), 0.0))
    return to_image_size(_min_max(_resize(cam, *input_size)), image_hw, input_size)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colour map) over an RGB image; returns (H, W, 3) uint8. A heatmap
    of another size is resized to the image first."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    heat = _resize(np.asarray(heat, dtype=np.float32), rgb.shape[0], rgb.shape[1])
    idx = np.clip((np.clip(heat, 0.0, 1.0) * 256).astype(np.int64), 0, 255)
    colour = JET[idx] * 255.0
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colour
    return np.clip(out, 0, 255).astype(np.uint8)
