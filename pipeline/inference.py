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

Engines (``load_model(..., engine=...)``): the forward pass runs either in torch (channels_last
memory format) or, on the CPU, in ONNX Runtime on a graph exported from the same torch model
when the predictor is built (in memory: no second weights file to keep in step). ``auto`` (the
default) picks ONNX Runtime on the CPU when ``onnxruntime`` and ``onnx`` are installed, else
torch. Before an ONNX session is used, it must reproduce the torch model's probabilities and
embeddings on a probe batch to within :data:`ONNX_TOLERANCE`; otherwise ``auto`` falls back to
torch (with a warning) and ``onnx`` raises :class:`ModelLoadError`. On 2 CPU cores ONNX Runtime
predicts EfficientNet-Lite0 at 112x150 about 1.7x faster than torch at batch 8 and 4x at batch 1
(benchmarks/serve_load.py). Grad-CAM always uses the torch model (:attr:`Predictor.model`).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
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
ENGINES = ("auto", "torch", "onnx")
#: Largest absolute difference (probabilities and embeddings) an ONNX session may show against the
#: torch model on the probe batch before it is refused. Float32 reorderings give about 1e-6.
ONNX_TOLERANCE = 1e-4

logger = logging.getLogger("lesionflow.inference")


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


class _EmbedAndHead(nn.Module):
    """``(images[, metadata]) -> (logits, embeddings)``: what the ONNX graph computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model.embed(x, metadata)
        return self.model.head(emb), emb


def onnx_available() -> bool:
    """True when ONNX Runtime and the ONNX exporter's ``onnx`` package can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model: models.LesionClassifier, input_size: tuple[int, int], metadata_dim: int | None) -> bytes:
    """The classifier as an ONNX graph (opset 17, dynamic batch): inputs ``images`` (N, 3, H, W)
    float32 [+ ``metadata`` (N, metadata_dim)], outputs ``logits`` and ``embeddings``."""
    h, w = input_size
    wrapped = _EmbedAndHead(model).eval()
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, h, w),)
    names = ["images"]
    if metadata_dim is not None:
        args += (models.missing_metadata(2, metadata_dim),)
        names.append("metadata")
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(wrapped, args, buf, input_names=names, output_names=["logits", "embeddings"],
                          dynamic_axes={n: {0: "batch"} for n in names + ["logits", "embeddings"]},
                          opset_version=17, dynamo=False)
    return buf.getvalue()


class OnnxForward:
    """An ONNX Runtime session computing :class:`_EmbedAndHead` of a model (CPU)."""

    def __init__(self, graph: bytes, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        # no busy-waiting between ops: the service shares its few cores with request decoding and
        # the event loop (ONNX Runtime's advice for CPUs shared with other work)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, x: torch.Tensor, meta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        feed = {"images": x.detach().cpu().contiguous().numpy()}
        if "metadata" in self.inputs:
            feed["metadata"] = meta.detach().cpu().float().contiguous().numpy()
        logits, emb = self.session.run(None, feed)
        return torch.from_numpy(logits), torch.from_numpy(emb)


class Predictor:
    """A trained model with its preprocessing. Build with :func:`load_model`."""

    def __init__(self, model: models.LesionClassifier, config: Mapping[str, Any], device: torch.device | str = "cpu",
                 engine: str = "torch"):
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
        self.metadata_encoder = (
            models.MetadataEncoder.from_dict(arch["metadata"]) if arch.get("metadata") else None
        )
        self.default_tta: bool = bool(config.get("inference", {}).get("tta", False))
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
        diff = max(float((torch.softmax(logits, 1) - torch.softmax(ref_logits.float(), 1)).abs().max()),
                   float((emb - ref_emb.float()).abs().max()))
        if not diff <= ONNX_TOLERANCE:
            raise ModelLoadError(f"the ONNX graph disagrees with the torch model by {diff:.2e} "
                                 f"(tolerance {ONNX_TOLERANCE:g})")

    def clone(self, engine: str = "torch") -> "Predictor":
        """An independent predictor on a deep copy of the model (e.g. for Grad-CAM hooks)."""
        import copy

        return Predictor(copy.deepcopy(self.model), self.config, self.device, engine=engine)

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
    def _torch_forward(self, x: torch.Tensor, meta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model.embed(x.contiguous(memory_format=torch.channels_last), meta)
        return self.model.head(emb), emb

    @torch.no_grad()
    def logits_and_embeddings(
        self, x: torch.Tensor, meta: torch.Tensor | None, tta: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities (averaged over flips with ``tta``) and embeddings of the plain view."""
        n = x.shape[0]
        views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)] if tta else [x]
        batch = torch.cat(views) if len(views) > 1 else x  # every view in one forward pass
        metas = None if meta is None else (torch.cat([meta] * len(views)) if len(views) > 1 else meta)
        forward = self._onnx if self._onnx is not None else self._torch_forward
        logits, emb = forward(batch, metas)
        probs = torch.softmax(logits.float(), dim=1).view(len(views), n, -1).mean(0)
        return probs, emb[:n].float()

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


def load_model(model_dir: Path | str, device: torch.device | str | None = None, engine: str = "auto") -> Predictor:
    """Load ``model_dir/model.pt`` (a state_dict, with ``weights_only=True``) + ``config.json``;
    ``engine``: see :meth:`Predictor.set_engine` (default ``auto``)."""
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
    return Predictor(model, cfg, device, engine=engine)
