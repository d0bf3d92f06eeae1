"""THE prediction path: one preprocessing + prediction code shared by evaluate, the service and
monitoring, so that what is evaluated is exactly what is served.

    predictor = load_model("artifacts/model")            # state_dict (weights_only) + config.json
    out = predictor.predict([rgb_uint8_hxwx3, ...], metadata=df_or_None)
    out["dx_probs"], out["risk_probs"], out["binary_probs"], out["p_malignant"], out["embeddings"]
    out["in_distribution"], out["ood_score"]             # None for a model without an OOD detector

The model is trained on one label level (``out["native_level"]``: ``dx`` by default, or ``risk``
or ``binary``); the coarser levels are derived by summing probabilities through the taxonomy
(:mod:`pipeline.core.taxonomy`), so every level's probabilities sum to one. A finer level than the
native one cannot be derived: it is ``None`` (e.g. ``dx_probs`` of a model trained on ``risk``).

Trust: the probabilities are temperature-scaled (:mod:`pipeline.model.calibration`; ``T`` from
``config.json`` ``calibration``, 1 when absent) and every image gets an out-of-distribution score
and verdict (:mod:`pipeline.model.ood`; ``config.json`` ``ood`` + ``ood.npz``), so that evaluate,
the service, ``lesionflow predict`` and monitoring agree. ``size_limits``
(:class:`pipeline.core.formats.SizeLimits`, ``config.json`` ``input_limits``) are the image sizes
the model can judge; callers that take images from users check them.

Loading never unpickles: ``torch.load(..., weights_only=True)`` on the state_dict and JSON for
everything else. Imports only torch/numpy (pandas is optional) so it runs anywhere.

Engines (``load_model(..., engine=...)``): the forward pass runs either in torch (channels_last
memory format) or, on the CPU, in ONNX Runtime (:mod:`pipeline.model.onnx`) on a graph exported
from the same torch model when the predictor is built. ``auto`` (the default) picks ONNX Runtime
on the CPU when ``onnxruntime`` and ``onnx`` are installed, else torch. Before an ONNX session is
used, it must reproduce the torch model's probabilities and embeddings on a probe batch to within
:data:`ONNX_TOLERANCE`; otherwise ``auto`` falls back to torch (with a warning) and ``onnx``
raises :class:`ModelLoadError`. Grad-CAM always uses the torch model (:attr:`Predictor.model`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core.formats import SizeLimits
from pipeline.core.images import fit_to_size
from pipeline.core.taxonomy import LEVELS, Taxonomy
from pipeline.model import bundle, checkpoint
from pipeline.model.augment import flip_views
from pipeline.model.bundle import CONFIG_FILE, MODEL_FILE, OOD_FILE, ModelLoadError
from pipeline.model.classifier import LesionClassifier, from_architecture, missing_metadata
from pipeline.model.metadata import MetadataEncoder
from pipeline.model.onnx import OnnxForward, export_onnx, onnx_available
from pipeline.model.ood import OodDetector

__all__ = ["ENGINES", "ModelLoadError", "Predictor", "derive_levels", "level_matrix", "load_model"]

ENGINES = ("auto", "torch", "onnx")
#: Largest absolute difference (probabilities and embeddings) an ONNX session may show against the
#: torch model on the probe batch before it is refused. Float32 reorderings give about 1e-6.
ONNX_TOLERANCE = 1e-4

logger = logging.getLogger("lesionflow.inference")


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
    for level in LEVELS:
        if level == native_level:
            out[level] = np.asarray(probs, dtype=np.float64)
            continue
        m = level_matrix(taxonomy, native_level, level)
        out[level] = None if m is None else np.asarray(probs, dtype=np.float64) @ m
    return out


class Predictor:
    """A trained model with its preprocessing. Build with :func:`load_model`."""

    def __init__(
        self,
        model: LesionClassifier,
        config: Mapping[str, Any],
        device: torch.device | str = "cpu",
        engine: str = "torch",
        ood_arrays: Mapping[str, np.ndarray] | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model.to(memory_format=torch.channels_last)
        self.config = dict(config)
        self.taxonomy = Taxonomy.from_dict(config["taxonomy"])
        self.native_level: str = config["target_level"]
        self.classes: list[str] = list(config["classes"])
        pre = config["preprocessing"]
        self.input_size: tuple[int, int] = (int(pre["input_size"][0]), int(pre["input_size"][1]))
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(pre["std"], dtype=torch.float32).view(1, 3, 1, 1)
        arch = config["architecture"]
        self.metadata_encoder = MetadataEncoder.from_dict(arch["metadata"]) if arch.get("metadata") else None
        self.default_tta: bool = bool(config.get("inference", {}).get("tta", False))
        self.temperature: float = float((config.get("calibration") or {}).get("temperature", 1.0))
        self.size_limits = SizeLimits.from_dict(config.get("input_limits"))
        self._ood_arrays = dict(ood_arrays or {})
        entry = config.get("ood")
        self.ood: OodDetector | None = (
            OodDetector.from_config(entry, self._ood_arrays, self.temperature) if entry else None
        )
        self.engine = "torch"
        self._onnx: OnnxForward | None = None
        self.set_engine(engine)

    # -- engine --------------------------------------------------------------------------------
    def set_engine(self, engine: str) -> str:
        """Run the forward pass in ``torch``, ``onnx`` (ONNX Runtime, CPU only) or ``auto`` (ONNX
        Runtime on the CPU when installed, else torch). The ONNX graph is exported from
        :attr:`model` and checked against it on a probe batch (:data:`ONNX_TOLERANCE`). Returns
        the engine in use."""
        if engine not in ENGINES:
            raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
        if engine == "torch" or (engine == "auto" and (self.device.type != "cpu" or not onnx_available())):
            self.engine, self._onnx = "torch", None
            return self.engine
        if self.device.type != "cpu":
            raise ModelLoadError(f"engine 'onnx' runs on the CPU only (device is {self.device})")
        try:
            meta_dim = self.metadata_encoder.dim if self.metadata_encoder is not None else None
            session = OnnxForward(export_onnx(self.model, self.input_size, meta_dim))
            self._check_onnx(session)
        except Exception as exc:  # export, session or agreement failure
            if engine == "onnx":
                raise ModelLoadError(f"ONNX Runtime engine unavailable for this model: {exc}") from None
            logger.warning("ONNX Runtime engine unavailable (%s); predicting with torch", exc)
            self.engine, self._onnx = "torch", None
            return self.engine
        self.engine, self._onnx = "onnx", session
        return self.engine

    def _check_onnx(self, session: OnnxForward) -> None:
        gen = torch.Generator().manual_seed(0)
        h, w = self.input_size
        u8 = torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8, generator=gen)
        x = self.normalize(u8)
        meta = self.encode_metadata(None, 3)
        with torch.no_grad():
            ref_logits, ref_emb = self._torch_forward(x, meta)
        logits, emb = session(x, meta)
        diff = max(
            float((torch.softmax(logits, 1) - torch.softmax(ref_logits.float(), 1)).abs().max()),
            float((emb - ref_emb.float()).abs().max()),
        )
        if not diff <= ONNX_TOLERANCE:
            raise ModelLoadError(
                f"the ONNX graph disagrees with the torch model by {diff:.2e} (tolerance {ONNX_TOLERANCE:g})"
            )

    def clone(self, engine: str = "torch") -> Predictor:
        """An independent predictor on a deep copy of the model (e.g. for Grad-CAM hooks)."""
        import copy

        return Predictor(copy.deepcopy(self.model), self.config, self.device, engine, self._ood_arrays)

    # -- access for explanations ---------------------------------------------------------------
    @property
    def target_layer(self) -> nn.Module:
        """The Grad-CAM target layer (last convolutional stage of the backbone)."""
        return self.model.gradcam_layer()

    # -- preprocessing -------------------------------------------------------------------------
    def resize(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, 3, H, W) uint8 at the model's input size (same resize as training's cache)."""
        h, w = self.input_size
        if (
            isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and images.ndim == 4
            and tuple(images.shape[1:]) == (3, h, w)
        ):
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
            return missing_metadata(n, self.metadata_encoder.dim, self.device)
        arr = self.metadata_encoder.encode(metadata, n)
        return torch.from_numpy(arr).to(self.device)

    # -- prediction ----------------------------------------------------------------------------
    def _torch_forward(self, x: torch.Tensor, meta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model.embed(x.contiguous(memory_format=torch.channels_last), meta)
        return self.model.head(emb), emb

    @torch.no_grad()
    def forward(self, x: torch.Tensor, meta: torch.Tensor | None, tta: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of every view ``(views, n, k)`` (the four flips with ``tta``, all in one forward
        pass) and the embeddings of the plain view ``(n, d)``."""
        n = x.shape[0]
        views = flip_views(x) if tta else [x]
        batch = torch.cat(views) if len(views) > 1 else x
        metas = None if meta is None else (torch.cat([meta] * len(views)) if len(views) > 1 else meta)
        forward = self._onnx if self._onnx is not None else self._torch_forward
        logits, emb = forward(batch, metas)
        return logits.float().view(len(views), n, -1), emb[:n].float()

    def probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Mean over views of ``softmax(logits / T)`` (``T`` = 1 when not ``calibrated``)."""
        t = self.temperature if calibrated else 1.0
        return torch.softmax(logits / t, dim=2).mean(0)

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
        ``binary_probs`` (class order in ``classes``), ``p_malignant`` (all calibrated),
        ``embeddings``, ``native_level``, ``native_probs``, ``native_probs_uncalibrated``,
        ``logits`` (views, n, k), ``ood_score`` and ``in_distribution`` (None without a
        detector) and ``classes`` (level -> class names).
        """
        tta = self.default_tta if tta is None else tta
        z, emb = self.forward_all(images, metadata, tta, batch_size)
        native = self.probabilities(z).numpy().astype(np.float64)
        raw = native if self.temperature == 1.0 else self.probabilities(z, calibrated=False).numpy().astype(np.float64)
        levels = derive_levels(native, self.native_level, self.taxonomy)
        binary = levels["binary"]
        score = self.ood.score(emb, z.numpy()) if self.ood is not None else None
        return {
            "native_level": self.native_level,
            "native_probs": native,
            "native_probs_uncalibrated": raw,
            "logits": z.numpy(),
            "dx_probs": levels["dx"],
            "risk_probs": levels["risk"],
            "binary_probs": binary,
            "p_malignant": binary[:, self.taxonomy.positive_index] if binary is not None else None,
            "embeddings": emb,
            "ood_score": score,
            "in_distribution": self.ood.in_distribution(score) if score is not None else None,
            "classes": {lvl: list(self.taxonomy.classes(lvl)) for lvl in ("dx", "risk", "binary")},
        }

    def forward_all(
        self, images: Sequence[np.ndarray] | torch.Tensor, metadata: Any, tta: bool, batch_size: int
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Logits ``(views, n, k)`` on the CPU and plain-view embeddings ``(n, d)`` of every image,
        ``batch_size`` images per forward pass."""
        u8 = self.resize(images)
        n = u8.shape[0]
        meta = self.encode_metadata(metadata, n)
        logits, embs = [], []
        for s in range(0, n, batch_size):
            x = self.normalize(u8[s : s + batch_size])
            m = meta[s : s + batch_size] if meta is not None else None
            z, e = self.forward(x, m, tta)
            logits.append(z.cpu())
            embs.append(e.cpu().numpy())
        k = len(self.classes)
        z = torch.cat(logits, dim=1) if logits else torch.zeros((4 if tta else 1, 0, k))
        emb = np.concatenate(embs) if embs else np.zeros((0, self.model.embedding_dim), np.float32)
        return z, emb


def load_model(model_dir: Path | str, device: torch.device | str | None = None, engine: str = "auto") -> Predictor:
    """Load ``model_dir/model.pt`` (a state_dict, with ``weights_only=True``) + ``config.json``
    (:mod:`pipeline.model.checkpoint`); ``engine``: see :meth:`Predictor.set_engine` (default ``auto``).
    A packaged model is first checked against its ``metadata.json`` (:func:`pipeline.model.bundle.verify`):
    a file altered since packaging is refused with :class:`ModelLoadError` naming it."""
    model_dir = Path(model_dir)
    bundle.verify(model_dir)
    cfg = checkpoint.read_config(model_dir)
    state = checkpoint.load_state(model_dir)
    model = from_architecture(cfg["architecture"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{model_dir / MODEL_FILE}: does not match the architecture in {CONFIG_FILE} ({exc})"
        ) from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    entry = cfg.get("ood")
    arrays = checkpoint.load_arrays(model_dir, OOD_FILE) if (entry or {}).get("file") else None
    if entry:
        try:
            OodDetector.from_config(entry, arrays or {}, 1.0)
        except (ValueError, KeyError) as exc:  # an inconsistent ood entry
            raise ModelLoadError(f"{model_dir / CONFIG_FILE}: ood: {exc}") from None
    return Predictor(model, cfg, device, engine, arrays)
