"""Explanations: which image regions and which metadata fields lead to a classification.

* :func:`gradcam` - a Grad-CAM heatmap (``grad-cam`` package, ``pytorch_grad_cam``) of one RGB
  image for one class, returned at the **image's own size** as floats in [0, 1]; the evaluation
  report and the BentoML service both use it.
* :func:`overlay` - the heatmap blended over the image as a uint8 RGB picture (jet colour map;
  :mod:`pipeline.model.cam`, which also gives the same heatmap without torch from the packaged
  ONNX graph's class activation maps).
* :func:`metadata_attribution` - integrated gradients of the class probability with respect to
  the metadata vector (age, sex, localization) when the model fuses metadata, from the
  "everything missing" baseline; aggregated per field by :func:`attribution_by_field`.

The model side comes from a predictor (see :mod:`pipeline.model.inference`); :func:`explain_parts`
adapts it to the three things Grad-CAM needs (the torch module, its target layer and the
preprocessing of one image), so that tests can also pass a tiny hand-built model directly
via :class:`ExplainParts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.model.cam import overlay, to_image_size

__all__ = ["ExplainParts", "explain_parts", "gradcam", "overlay", "metadata_attribution", "attribution_by_field"]


@dataclass
class ExplainParts:
    """What explanations need from a model.

    ``model(x)`` or ``model(x, metadata)`` returns logits (N, K); ``target_layer`` is the module
    whose activations Grad-CAM weights; ``to_tensor`` turns one (H, W, 3) uint8 RGB image into the
    model's (1, 3, h, w) input (resizing and normalising exactly like prediction does);
    ``input_size`` is the model's (h, w); ``encode_metadata(metadata, n)`` (fusion models only)
    gives the (n, D) metadata tensor, the "all missing" one for ``metadata=None``;
    ``metadata_fields`` names its D columns.
    """

    model: nn.Module
    target_layer: nn.Module
    to_tensor: Callable[[np.ndarray], torch.Tensor]
    input_size: tuple[int, int] | None = None
    encode_metadata: Callable[[Any, int], torch.Tensor | None] | None = None
    metadata_fields: Sequence[str] | None = None


def explain_parts(predictor: Any) -> ExplainParts:
    """Adapt a :class:`pipeline.model.inference.Predictor` (or pass an :class:`ExplainParts` through)."""
    if isinstance(predictor, ExplainParts):
        return predictor
    model = getattr(predictor, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{type(predictor).__name__} has no torch module in .model")
    encoder = getattr(predictor, "metadata_encoder", None)
    fused = encoder is not None and getattr(model, "metadata_dim", 0) > 0
    return ExplainParts(
        model=model,
        target_layer=predictor.target_layer,
        to_tensor=lambda rgb: predictor.preprocess([rgb]),
        input_size=tuple(predictor.input_size),
        encode_metadata=predictor.encode_metadata if fused else None,
        metadata_fields=_encoder_fields(encoder) if fused else None,
    )


def _encoder_fields(encoder: Any) -> list[str]:
    """Field name of each metadata column (layout of models.MetadataEncoder)."""
    sexes = list(getattr(encoder, "sexes", ()))
    locs = list(getattr(encoder, "localizations", ()))
    return ["age", "age_missing"] + [f"sex={s}" for s in sexes] + [f"localization={loc}" for loc in locs]


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _WithMetadata(nn.Module):
    """Freeze the metadata input so that Grad-CAM can call ``model(x)``."""

    def __init__(self, model: nn.Module, metadata: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.metadata = metadata

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.metadata is None:
            return self.model(x)
        return self.model(x, self.metadata[:1].expand(x.shape[0], -1))


def gradcam(
    predictor: Any,
    rgb_image: np.ndarray,
    target_class: int | None = None,
    metadata: Any = None,
) -> np.ndarray:
    """Grad-CAM heatmap of ``rgb_image`` (H, W, 3 uint8) for ``target_class`` (default: the
    predicted class), as an (H, W) float32 array in [0, 1] at the image's own size.

    ``metadata`` (a one-row mapping/DataFrame of age/sex/localization) is passed to fusion models;
    without it their metadata input is "all missing".
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    parts = explain_parts(predictor)
    rgb = np.asarray(rgb_image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    device = _device(parts.model)
    x = torch.as_tensor(parts.to_tensor(rgb)).to(device).float()
    if x.ndim == 3:
        x = x[None]
    meta = None
    if parts.encode_metadata is not None:
        meta = torch.as_tensor(parts.encode_metadata(metadata, 1), dtype=torch.float32).to(device)
    wrapped = _WithMetadata(parts.model, meta)
    was_training = parts.model.training
    try:
        with GradCAM(model=wrapped, target_layers=[parts.target_layer]) as cam:
            if target_class is None:
                with torch.no_grad():
                    target_class = int(wrapped(x).argmax(1)[0])
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(target_class))])[0]
    finally:
        parts.model.train(was_training)
    return to_image_size(heat, (h, w), parts.input_size)


def metadata_attribution(
    predictor: Any,
    images: Sequence[np.ndarray],
    metadata: Any,
    target_classes: Sequence[int],
    steps: int = 32,
) -> np.ndarray | None:
    """Integrated gradients of the target-class probability w.r.t. each metadata input.

    Baseline: the "everything missing" vector (the encoding of an empty record). Returns an
    (N, D) array (attributions sum, per image, to p(x, m) - p(x, baseline) up to the Riemann
    error), or None when the model does not fuse metadata.
    """
    parts = explain_parts(predictor)
    if parts.encode_metadata is None:
        return None
    model = parts.model
    device = _device(model)
    n = len(images)
    meta = torch.as_tensor(parts.encode_metadata(metadata, n), dtype=torch.float32).to(device)
    base = torch.as_tensor(parts.encode_metadata(None, n), dtype=torch.float32).to(device)
    was_training = model.training
    model.eval()
    out = np.zeros(tuple(meta.shape), dtype=np.float64)
    alphas = (torch.arange(steps, dtype=torch.float32, device=device) + 0.5) / steps  # midpoint rule
    try:
        for i in range(n):
            x = torch.as_tensor(parts.to_tensor(np.asarray(images[i]))).to(device).float()
            if x.ndim == 3:
                x = x[None]
            path = base[i] + alphas[:, None] * (meta[i] - base[i])[None]
            path.requires_grad_(True)
            feats = None
            if hasattr(model, "embed") and hasattr(model, "meta") and hasattr(model, "head"):
                # image features do not depend on the metadata: compute them once
                with torch.no_grad():
                    feats = model.neck(model.pool(model.backbone(x)).flatten(1))
                logits = model.head(torch.cat([feats.expand(steps, -1), model.meta(path)], dim=1))
            else:
                logits = model(x.expand(steps, -1, -1, -1), path)
            prob = torch.softmax(logits, dim=1)[:, int(target_classes[i])].sum()
            (grad,) = torch.autograd.grad(prob, path)
            out[i] = ((meta[i] - base[i]) * grad.mean(0)).detach().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def attribution_by_field(attr: np.ndarray, fields: Sequence[str]) -> dict[str, float]:
    """Mean absolute attribution per field (``age``, ``sex``, ``localization``): the columns of
    :func:`metadata_attribution` summed per field within an image, then |.| averaged over images."""
    attr = np.asarray(attr, dtype=np.float64)
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(fields):
        groups.setdefault(name.split("=", 1)[0].replace("_missing", ""), []).append(j)
    return {g: float(np.abs(attr[:, cols].sum(axis=1)).mean()) for g, cols in groups.items()}
