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
the service, ``lesionflow predict`` and monitoring agree. Everything around the forward pass
(resize, metadata, TTA views, calibration, levels, OOD) is :class:`pipeline.model.runtime.BasePredictor`,
shared with the torch-free :class:`~pipeline.model.runtime.OnnxPredictor` the service uses. ``size_limits``
(:class:`pipeline.core.formats.SizeLimits`, ``config.json`` ``input_limits``) are the image sizes
the model can judge; callers that take images from users check them.

Loading never unpickles: ``torch.load(..., weights_only=True)`` on the state_dict and JSON for
everything else. Imports only torch/numpy (pandas is optional) so it runs anywhere.

Engines (``load_model(..., engine=...)``): the forward pass runs either in torch (channels_last
memory format) or, on the CPU, in ONNX Runtime on a graph exported (:mod:`pipeline.model.onnx`)
from the same torch model when the predictor is built. ``auto`` (the default) picks ONNX Runtime
on the CPU when ``onnxruntime`` and ``onnx`` are installed, else torch. Before an ONNX session is
used, it must reproduce the torch model's probabilities and embeddings on a probe batch to within
:data:`ONNX_TOLERANCE`; otherwise ``auto`` falls back to torch (with a warning) and ``onnx``
raises :class:`ModelLoadError`. Grad-CAM here uses the torch model (:attr:`Predictor.model`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.core import fsutil
from pipeline.model import bundle, checkpoint
from pipeline.model.augment import flip_views
from pipeline.model.bundle import CONFIG_FILE, MODEL_FILE, ModelLoadError
from pipeline.model.classifier import LesionClassifier, from_architecture, missing_metadata
from pipeline.model.onnx import OPSET, TOLERANCE, disagreement, export_onnx, has_cams, onnx_available
from pipeline.model.runtime import BasePredictor, OnnxSession, derive_levels, level_matrix, read_ood

__all__ = ["ENGINES", "ModelLoadError", "Predictor", "derive_levels", "level_matrix", "load_model", "write_onnx"]

ENGINES = ("auto", "torch", "onnx")
#: Largest difference an ONNX session may show against the torch model (:data:`pipeline.model.onnx.TOLERANCE`).
ONNX_TOLERANCE = TOLERANCE

logger = logging.getLogger("lesionflow.inference")


class Predictor(BasePredictor):
    """A trained model with its preprocessing, run in torch (or an ONNX graph exported from it).
    Build with :func:`load_model`; what is shared with the torch-free predictor is
    :class:`pipeline.model.runtime.BasePredictor`."""

    def __init__(
        self,
        model: LesionClassifier,
        config: Mapping[str, Any],
        device: torch.device | str = "cpu",
        engine: str = "torch",
        ood_arrays: Mapping[str, np.ndarray] | None = None,
    ):
        super().__init__(config, ood_arrays)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.model.to(memory_format=torch.channels_last)
        self.embedding_dim = self.model.embedding_dim
        self.mean = torch.from_numpy(self.mean_rgb)
        self.std = torch.from_numpy(self.std_rgb)
        self.engine = "torch"
        self._onnx: OnnxSession | None = None
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
            session = OnnxSession(export_onnx(self.model, self.input_size, meta_dim), threads=torch.get_num_threads())
            self._check_onnx(session)
        except Exception as exc:  # export, session or agreement failure
            if engine == "onnx":
                raise ModelLoadError(f"ONNX Runtime engine unavailable for this model: {exc}") from None
            logger.warning("ONNX Runtime engine unavailable (%s); predicting with torch", exc)
            self.engine, self._onnx = "torch", None
            return self.engine
        self.engine, self._onnx = "onnx", session
        return self.engine

    def _check_onnx(self, session: OnnxSession) -> None:
        diff = disagreement(self, session)
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
        """The Grad-CAM target layer (the last feature map of the backbone)."""
        return self.model.gradcam_layer()

    # -- preprocessing -------------------------------------------------------------------------
    def resize(self, images: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 tensor at the model's input size (:meth:`resize_u8`)."""
        return torch.from_numpy(self.resize_u8(images))

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.to(self.device).float().div_(255.0)
        return (x - self.mean.to(self.device)) / self.std.to(self.device)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """List of (H, W, 3) uint8 RGB arrays (any size) -> normalised (N, 3, H, W) float tensor."""
        return self.normalize(self.resize(images))

    def encode_metadata(self, metadata: Any, n: int) -> torch.Tensor | None:
        """:meth:`metadata_array` as a tensor on the model's device."""
        if self.metadata_encoder is None:
            return None
        if metadata is None:
            return missing_metadata(n, self.metadata_encoder.dim, self.device)
        return torch.from_numpy(self.metadata_array(metadata, n)).to(self.device)

    # -- prediction ----------------------------------------------------------------------------
    def _torch_forward(self, x: torch.Tensor, meta: torch.Tensor | None, blocks: bool) -> tuple[torch.Tensor, ...]:
        x = x.contiguous(memory_format=torch.channels_last)
        if blocks:
            emb, pooled = self.model.embed_with_blocks(x, meta)
            return self.model.head(emb), emb, pooled
        emb = self.model.embed(x, meta)
        return self.model.head(emb), emb, None

    def _onnx_forward(self, x: torch.Tensor, meta: torch.Tensor | None, blocks: bool) -> tuple[torch.Tensor, ...]:
        feed = {"images": x.cpu().numpy(), "metadata": None if meta is None else meta.cpu().numpy()}
        out = self._onnx.run(feed, blocks=blocks)
        return torch.from_numpy(out[0]), torch.from_numpy(out[1]), torch.from_numpy(out[2]) if blocks else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor, meta: torch.Tensor | None, tta: bool, blocks: bool = False) -> tuple:
        """Logits of every view ``(views, n, k)`` (the four flips with ``tta``, all in one forward
        pass), the embeddings of the plain view ``(n, d)`` and, with ``blocks``, its pooled block
        outputs ``(n, b)`` (else None)."""
        n = x.shape[0]
        views = flip_views(x) if tta else [x]
        batch = torch.cat(views) if len(views) > 1 else x
        metas = None if meta is None else (torch.cat([meta] * len(views)) if len(views) > 1 else meta)
        forward = self._onnx_forward if self._onnx is not None else self._torch_forward
        logits, emb, pooled = forward(batch, metas, blocks)
        return logits.float().view(len(views), n, -1), emb[:n].float(), None if pooled is None else pooled[:n].float()

    def forward_batch(self, u8: np.ndarray, meta: np.ndarray | None, tta: bool) -> tuple:
        x = self.normalize(torch.from_numpy(u8))
        if meta is None and self.metadata_encoder is not None:
            meta = self.metadata_array(None, len(u8))
        z, e, b = self.forward(
            x, None if meta is None else torch.from_numpy(meta).to(self.device), tta, self.wants_blocks
        )
        return z.cpu().numpy(), e.cpu().numpy(), None if b is None else b.cpu().numpy()

    def probabilities(self, logits: Any, calibrated: bool = True) -> np.ndarray:
        """Mean over views of ``softmax(logits / T)`` (``T`` = 1 when not ``calibrated``); float64."""
        t = self.temperature if calibrated else 1.0
        z = torch.as_tensor(logits)
        return torch.softmax(z / t, dim=2).mean(0).numpy().astype(np.float64)


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
    return Predictor(model, cfg, device, engine, read_ood(model_dir, cfg))


def write_onnx(model_dir: Path | str, file_name: str = bundle.ONNX_FILE) -> dict[str, Any]:
    """Export the model of ``model_dir`` to ``model_dir/file_name`` (ONNX, with its class activation
    maps when CAM equals its Grad-CAM: :func:`pipeline.model.onnx.has_cams`), after checking the
    graph against the torch model (:func:`pipeline.model.onnx.disagreement` at most
    :data:`ONNX_TOLERANCE`, else :class:`ModelLoadError` and nothing written). Returns what
    ``metadata.json`` records of it. Packaging calls it, so that the service needs no torch."""
    predictor = load_model(model_dir, device="cpu", engine="torch")
    enc = predictor.metadata_encoder
    cams = has_cams(predictor.model)
    graph = export_onnx(predictor.model, predictor.input_size, enc.dim if enc is not None else None, cams)
    diff = disagreement(predictor, OnnxSession(graph, threads=1))
    if not diff <= ONNX_TOLERANCE:
        raise ModelLoadError(
            f"{Path(model_dir)}: the exported ONNX graph disagrees with the torch model by {diff:.2e} "
            f"(tolerance {ONNX_TOLERANCE:g}); not packaged"
        )
    fsutil.atomic_write_bytes(Path(model_dir) / file_name, graph)
    return {
        "file": file_name,
        "opset": OPSET,
        "outputs": ["logits", "embeddings"] + (["cams"] if cams else []) + ["blocks"],
        "checked_difference": diff,
        "tolerance": ONNX_TOLERANCE,
    }
