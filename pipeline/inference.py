"""THE prediction path: one preprocessing + prediction code shared by evaluate, the service and
monitoring, so that what is evaluated is exactly what is served.

    predictor = load_model("artifacts/model")            # state_dict (weights_only) + config.json
    out = predictor.predict([rgb_uint8_hxwx3, ...], metadata=df_or_None)
    out["dx_probs"], out["risk_probs"], out["binary_probs"], out["p_malignant"], out["embeddings"]

The model is trained on one label level (``out["native_level"]``: ``dx`` by default, or ``risk``
or ``binary``); the coarser levels are derived by summing probabilities through the taxonomy
(:mod:`pipeline.taxonomy`), so every level's probabilities sum to one. A finer level than the
native one cannot be derived: it is ``None`` (e.g. ``dx_probs`` of a model trained on ``risk``).

Loading never unpickles: ``torch.load(..., weights_only=True)`` on the state_dict and JSON for
everything else. Imports only torch/numpy (pandas is optional) so it runs anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pipeline import models
from pipeline.datapath import fit_to_size
from pipeline.taxonomy import Taxonomy

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
FORMAT = "lesionflow-model/1"


class ModelLoadError(RuntimeError):
    """A model directory that cannot be loaded; the message names the file."""


def level_matrix(taxonomy: Taxonomy, src: str, dst: str) -> np.ndarray | None:
    """(n_src, n_dst) 0/1 matrix summing ``src`` class probabilities into ``dst`` classes, or None
    when ``dst`` is not a coarsening of ``src`` (some ``src`` class spans several ``dst`` ones)."""
    m_src, m_dst = taxonomy.matrix(src), taxonomy.matrix(dst)  # (n_dx, n_src), (n_dx, n_dst)
    out = np.zeros((m_src.shape[1], m_dst.shape[1]))
    for j in range(m_src.shape[1]):
        members = m_src[:, j] > 0
        targets = np.unique(np.argmax(m_dst[members], axis=1))
        if len(targets) != 1:
            return None
        out[j, targets[0]] = 1.0
    return out


def derive_levels(probs: np.ndarray, native_level: str, taxonomy: Taxonomy) -> dict[str, np.ndarray | None]:
    """Probabilities at every level (``dx``, ``risk``, ``binary``) from the native level's."""
    out: dict[str, np.ndarray | None] = {}
    for level in ("dx", "risk", "binary"):
        if level == native_level:
            out[level] = np.asarray(probs, dtype=np.float64)
            continue
        m = level_matrix(taxonomy, native_level, level)
        out[level] = None if m is None else np.asarray(probs, dtype=np.float64) @ m
    return out


class _ImageOnly(nn.Module):
    """The classifier as a function of the image only (metadata fixed), for Grad-CAM."""

    def __init__(self, model: nn.Module, metadata: torch.Tensor | None):
        super().__init__()
        self.model = model
        self.metadata = metadata

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        meta = self.metadata
        if meta is not None and meta.shape[0] != x.shape[0]:
            meta = meta[:1].expand(x.shape[0], -1)
        return self.model(x, meta)


class Predictor:
    """A trained model with its preprocessing. Build with :func:`load_model`."""

    def __init__(self, model: models.LesionClassifier, config: Mapping[str, Any], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = dict(config)
        self.taxonomy = Taxonomy.from_dict(config["taxonomy"])
        self.native_level: str = config["target_level"]
        self.classes: list[str] = list(config["classes"])
        pre = config["preprocessing"]
        self.input_size: tuple[int, int] = (int(pre["input_size"][0]), int(pre["input_size"][1]))
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pre["std"], dtype=torch.float32).view(1, 3, 1, 1)
        arch = config["architecture"]
        self.metadata_encoder = (
            models.MetadataEncoder.from_dict(arch["metadata"]) if arch.get("metadata") else None
        )
        self.default_tta: bool = bool(config.get("inference", {}).get("tta", False))

    # -- access for explanations ---------------------------------------------------------------
    @property
    def target_layer(self) -> nn.Module:
        """The Grad-CAM target layer (last convolutional stage of the backbone)."""
        return self.model.gradcam_layer()

    def image_model(self, metadata: Any = None) -> nn.Module:
        """The model as ``f(images) -> logits`` with the metadata fixed (what Grad-CAM calls)."""
        meta = self.encode_metadata(metadata, 1) if self.metadata_encoder is not None else None
        return _ImageOnly(self.model, meta)

    # -- preprocessing -------------------------------------------------------------------------
    def resize(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, 3, H, W) uint8 at the model's input size (same resize as training's cache)."""
        h, w = self.input_size
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4 \
                and tuple(images.shape[1:]) == (3, h, w):
            return images
        arrs = []
        for i, img in enumerate(images):
            a = np.asarray(img)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got {a.dtype} {a.shape}")
            arrs.append(fit_to_size(a, h, w).transpose(2, 0, 1))
        if not arrs:
            return torch.zeros((0, 3, h, w), dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrs))

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.to(self.device).float().div_(255.0)
        return (x - self.mean.to(self.device)) / self.std.to(self.device)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """List of (H, W, 3) uint8 RGB arrays (any size) -> normalised (N, 3, H, W) float tensor."""
        return self.normalize(self.resize(images))

    def encode_metadata(self, metadata: Any, n: int) -> torch.Tensor | None:
        if self.metadata_encoder is None:
            return None
        if metadata is None:
            return models.missing_metadata(n, self.metadata_encoder.dim, self.device)
        arr = self.metadata_encoder.encode(metadata, n)
        return torch.from_numpy(arr).to(self.device)

    # -- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def logits_and_embeddings(
        self, x: torch.Tensor, meta: torch.Tensor | None, tta: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities (averaged over flips with ``tta``) and embeddings of the plain view."""
        emb = self.model.embed(x, meta)
        probs = torch.softmax(self.model.head(emb).float(), dim=1)
        if tta:
            views = [x.flip(3), x.flip(2), x.flip(2).flip(3)]
            for v in views:
                probs = probs + torch.softmax(self.model(v, meta).float(), dim=1)
            probs = probs / (1 + len(views))
        return probs, emb.float()

    def predict(
        self,
        images: Sequence[np.ndarray] | torch.Tensor,
        metadata: Any = None,
        tta: bool | None = None,
        batch_size: int = 64,
    ) -> dict[str, Any]:
        """Predict a batch of RGB images (list of (H, W, 3) uint8 arrays of any size, or a uint8
        (N, 3, H, W) tensor already at the model's input size).

        ``metadata``: a DataFrame (or mapping of columns) with ``age``, ``sex``, ``localization``
        (any may be missing) for a fusion model; ignored otherwise. ``tta``: average over flips
        (default: the model's configured default).

        Returns ``dx_probs`` (n, 7; None if the model is coarser), ``risk_probs``,
        ``binary_probs`` (class order in ``classes``), ``p_malignant``, ``embeddings``,
        ``native_level``, ``native_probs`` and ``classes`` (level -> class names).
        """
        tta = self.default_tta if tta is None else tta
        u8 = self.resize(images)
        n = u8.shape[0]
        meta = self.encode_metadata(metadata, n)
        probs, embs = [], []
        for s in range(0, n, batch_size):
            x = self.normalize(u8[s : s + batch_size])
            m = meta[s : s + batch_size] if meta is not None else None
            p, e = self.logits_and_embeddings(x, m, tta)
            probs.append(p.cpu().numpy())
            embs.append(e.cpu().numpy())
        k = len(self.classes)
        native = np.concatenate(probs).astype(np.float64) if probs else np.zeros((0, k))
        emb = np.concatenate(embs) if embs else np.zeros((0, self.model.embedding_dim), np.float32)
        levels = derive_levels(native, self.native_level, self.taxonomy)
        binary = levels["binary"]
        return {
            "native_level": self.native_level,
            "native_probs": native,
            "dx_probs": levels["dx"],
            "risk_probs": levels["risk"],
            "binary_probs": binary,
            "p_malignant": binary[:, self.taxonomy.positive_index] if binary is not None else None,
            "embeddings": emb,
            "classes": {lvl: list(self.taxonomy.classes(lvl)) for lvl in ("dx", "risk", "binary")},
        }


def read_config(model_dir: Path | str) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        raise ModelLoadError(f"{path}: model config not found (train a model first: dvc repro train)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    for key in ("architecture", "taxonomy", "target_level", "classes", "preprocessing"):
        if key not in cfg:
            raise ModelLoadError(f"{path}: missing key {key!r}")
    return cfg


def load_model(model_dir: Path | str, device: torch.device | str | None = None) -> Predictor:
    """Load ``model_dir/model.pt`` (a state_dict, with ``weights_only=True``) + ``config.json``."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    weights = model_dir / MODEL_FILE
    if not weights.exists():
        raise ModelLoadError(f"{weights}: model weights not found")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or not a plain state_dict
        raise ModelLoadError(f"{weights}: cannot be loaded as a state_dict ({exc})") from None
    model = models.from_architecture(cfg["architecture"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"{weights}: does not match the architecture in {CONFIG_FILE} ({exc})") from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Predictor(model, cfg, device)
