"""Prediction without torch: what every predictor shares, and the ONNX Runtime predictor the
service answers with.

:class:`BasePredictor` reads a model's ``config.json`` (classes, taxonomy, preprocessing,
calibration, OOD detector, size limits) and owns the steps around the forward pass: resizing
(:func:`pipeline.core.images.fit_to_size`), metadata encoding, the four TTA views, temperature
scaling, the coarser label levels and the OOD verdict. Its subclasses only run the network:
:class:`pipeline.model.inference.Predictor` in torch, :class:`OnnxPredictor` in ONNX Runtime on the
``model.onnx`` that packaging wrote and checked against the torch model
(:func:`pipeline.model.inference.write_onnx`), loaded by :func:`load_packaged`: a process that
answers with it never imports torch (the service: about 500 MB less per worker).

NumPy, Pillow and ONNX Runtime only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.formats import SizeLimits
from pipeline.core.images import fit_to_size
from pipeline.core.taxonomy import LEVELS, Taxonomy
from pipeline.model import bundle, checkpoint
from pipeline.model.bundle import CONFIG_FILE, OOD_FILE, ModelLoadError
from pipeline.model.cam import heatmap
from pipeline.model.metadata import MetadataEncoder
from pipeline.model.ood import OodDetector
from pipeline.model.quality import QualityChecks

__all__ = ["BasePredictor", "OnnxPredictor", "OnnxSession", "derive_levels", "level_matrix", "load_packaged"]

logger = logging.getLogger("lesionflow.inference")
#: One forward pass's outputs: logits of every view (views, n, k), the plain view's embeddings (n, d)
#: and its pooled block outputs (n, b), None unless asked for (:attr:`BasePredictor.wants_blocks`).
Forward = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


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


def flip_views(x: np.ndarray) -> list[np.ndarray]:
    """The four test-time views of an (N, C, H, W) batch, in
    :data:`pipeline.model.augment.TTA_VIEWS` order: itself, flipped left-right, up-down, both."""
    return [x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]]


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis`` (float32 in, float32 out)."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class BasePredictor:
    """A model's configuration and everything around its forward pass (see the module docstring).

    Subclasses implement :meth:`forward_batch`."""

    engine = "none"

    def __init__(self, config: Mapping[str, Any], ood_arrays: Mapping[str, np.ndarray] | None = None):
        self.config = dict(config)
        self.taxonomy = Taxonomy.from_dict(config["taxonomy"])
        self.native_level: str = config["target_level"]
        self.classes: list[str] = list(config["classes"])
        pre = config["preprocessing"]
        self.input_size: tuple[int, int] = (int(pre["input_size"][0]), int(pre["input_size"][1]))
        self.mean_rgb = np.asarray(pre["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.std_rgb = np.asarray(pre["std"], dtype=np.float32).reshape(1, 3, 1, 1)
        arch = config["architecture"]
        self.metadata_encoder = MetadataEncoder.from_dict(arch["metadata"]) if arch.get("metadata") else None
        self.embedding_dim = int(arch.get("feature_dim") or 0) + (
            int(arch.get("metadata_hidden", 32)) if self.metadata_encoder is not None else 0
        )
        self.default_tta: bool = bool(config.get("inference", {}).get("tta", False))
        self.temperature: float = float((config.get("calibration") or {}).get("temperature", 1.0))
        self.size_limits = SizeLimits.from_dict(config.get("input_limits"))
        self._ood_arrays = dict(ood_arrays or {})
        entry = config.get("ood")
        self.ood: OodDetector | None = (
            OodDetector.from_config(entry, self._ood_arrays, self.temperature) if entry else None
        )
        checks = config.get("quality")
        self.quality: QualityChecks | None = QualityChecks.from_config(checks) if checks else None
        #: Compute the pooled block outputs even when the detector does not need them (its fitting).
        self.blocks_wanted = False

    @property
    def wants_blocks(self) -> bool:
        """Whether predictions compute the pooled block outputs (the multi-layer OOD score's input)."""
        return self.blocks_wanted or (self.ood is not None and self.ood.needs_blocks)

    # -- preprocessing -------------------------------------------------------------------------
    def resize_u8(self, images: Any) -> np.ndarray:
        """(N, 3, H, W) uint8 at the model's input size (same resize as training's cache) from a
        list of (H, W, 3) uint8 RGB arrays of any size, or a batch already at that size."""
        h, w = self.input_size
        if getattr(images, "ndim", 0) == 4:
            a = np.asarray(images)
            if a.dtype == np.uint8 and tuple(a.shape[1:]) == (3, h, w):
                return a
        arrs = []
        for i, img in enumerate(images):
            a = np.asarray(img)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got {a.dtype} {a.shape}")
            arrs.append(fit_to_size(a, h, w).transpose(2, 0, 1))
        return np.stack(arrs) if arrs else np.zeros((0, 3, h, w), dtype=np.uint8)

    def normalize_array(self, u8: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, H, W) -> the model's normalised float32 input."""
        return ((u8.astype(np.float32) / np.float32(255.0)) - self.mean_rgb) / self.std_rgb

    def metadata_array(self, metadata: Any, n: int) -> np.ndarray | None:
        """(n, D) float32 metadata input of a fusion model (all missing for ``metadata=None``); None
        for a model without metadata. ``metadata``: a DataFrame or a mapping of columns."""
        if self.metadata_encoder is None:
            return None
        return self.metadata_encoder.encode(metadata, n)

    # -- prediction ----------------------------------------------------------------------------
    def forward_batch(self, u8: np.ndarray, meta: np.ndarray | None, tta: bool) -> Forward:
        """Logits of every view ``(views, n, k)``, plain-view embeddings ``(n, d)`` and, when
        :attr:`wants_blocks`, the plain view's pooled block outputs ``(n, b)`` (else None) of one batch."""
        raise NotImplementedError

    def probabilities(self, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Mean over views of ``softmax(logits / T)`` (``T`` = 1 when not ``calibrated``); float64."""
        t = np.float32(self.temperature if calibrated else 1.0)
        return softmax(np.asarray(logits, dtype=np.float32) / t, axis=2).mean(0).astype(np.float64)

    def forward_all(self, images: Any, metadata: Any, tta: bool, batch_size: int) -> Forward:
        """:meth:`forward_batch`'s outputs for every image, ``batch_size`` images per forward pass."""
        u8 = self.resize_u8(images)
        n = u8.shape[0]
        meta = self.metadata_array(metadata, n)
        logits, embs, blocks = [], [], []
        for s in range(0, n, batch_size):
            m = meta[s : s + batch_size] if meta is not None else None
            z, e, b = self.forward_batch(u8[s : s + batch_size], m, tta)
            logits.append(np.asarray(z, dtype=np.float32))
            embs.append(np.asarray(e, dtype=np.float32))
            blocks.append(None if b is None else np.asarray(b, dtype=np.float32))
        if not logits:
            empty = np.zeros((4 if tta else 1, 0, len(self.classes)), np.float32)
            return empty, np.zeros((0, self.embedding_dim), np.float32), None
        pooled = None if any(b is None for b in blocks) else np.concatenate(blocks)
        return np.concatenate(logits, axis=1), np.concatenate(embs), pooled

    def predict(
        self, images: Any, metadata: Any = None, tta: bool | None = None, batch_size: int = 64
    ) -> dict[str, Any]:
        """Predict a batch of RGB images (list of (H, W, 3) uint8 arrays of any size, or a uint8
        (N, 3, H, W) batch already at the model's input size).

        ``metadata``: a DataFrame (or mapping of columns) with ``age``, ``sex``, ``localization``
        (any may be missing) for a fusion model; ignored otherwise. ``tta``: average over flips
        (default: the model's configured default).

        Returns ``dx_probs`` (n, 7; None if the model is coarser), ``risk_probs``,
        ``binary_probs`` (class order in ``classes``), ``p_malignant`` (all calibrated),
        ``embeddings``, ``native_level``, ``native_probs``, ``native_probs_uncalibrated``,
        ``logits`` (views, n, k), ``ood_score`` and ``in_distribution`` (None without a
        detector), ``quality_reasons`` (per image the codes of :mod:`pipeline.model.quality` it
        failed, empty when it passed; None for a model without checks) and ``classes`` (level ->
        class names).
        """
        tta = self.default_tta if tta is None else tta
        u8 = self.resize_u8(images)
        z, emb, blocks = self.forward_all(u8, metadata, tta, batch_size)
        native = self.probabilities(z)
        raw = native if self.temperature == 1.0 else self.probabilities(z, calibrated=False)
        levels = derive_levels(native, self.native_level, self.taxonomy)
        binary = levels["binary"]
        score = self.ood.score(emb, z, blocks) if self.ood is not None else None
        return {
            "native_level": self.native_level,
            "native_probs": native,
            "native_probs_uncalibrated": raw,
            "logits": z,
            "dx_probs": levels["dx"],
            "risk_probs": levels["risk"],
            "binary_probs": binary,
            "p_malignant": binary[:, self.taxonomy.positive_index] if binary is not None else None,
            "embeddings": emb,
            "blocks": blocks,
            "ood_score": score,
            "in_distribution": self.ood.in_distribution(score) if score is not None else None,
            "quality_reasons": self.quality.reasons(u8) if self.quality is not None else None,
            "classes": {lvl: list(self.taxonomy.classes(lvl)) for lvl in ("dx", "risk", "binary")},
        }


def default_threads() -> int:
    """The cores this process may use (its CPU affinity; ``LESIONFLOW_THREADS`` overrides)."""
    if os.environ.get("LESIONFLOW_THREADS", "").isdigit() and int(os.environ["LESIONFLOW_THREADS"]) > 0:
        return int(os.environ["LESIONFLOW_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxSession:
    """An ONNX Runtime session (CPU) of a graph from :func:`pipeline.model.onnx.export_onnx`."""

    def __init__(self, graph: bytes | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        # no busy-waiting between ops: the service shares its few cores with request decoding and
        # the event loop (ONNX Runtime's advice for CPUs shared with other work)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.source = str(graph) if isinstance(graph, Path) else graph
        self.session = ort.InferenceSession(self.source, opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        self.has_cams = "cams" in outputs
        self.has_blocks = "blocks" in outputs  # graphs exported before the multi-layer OOD score lack it

    def run(self, feed: Mapping[str, np.ndarray | None], cams: bool = False, blocks: bool = False) -> list[np.ndarray]:
        """``[logits, embeddings]`` (+ ``cams``, + ``blocks`` when asked) for ``images`` [+ ``metadata``]."""
        given = {"images": np.ascontiguousarray(feed["images"], dtype=np.float32)}
        if "metadata" in self.inputs:
            given["metadata"] = np.ascontiguousarray(feed["metadata"], dtype=np.float32)
        names = ["logits", "embeddings"] + (["cams"] if cams else []) + (["blocks"] if blocks else [])
        return self.session.run(names, given)


class OnnxPredictor(BasePredictor):
    """A packaged model answered by ONNX Runtime alone (its ``model.onnx``), torch never imported."""

    engine = "onnx"

    def __init__(
        self,
        graph: OnnxSession | bytes | Path,
        config: Mapping[str, Any],
        ood_arrays: Mapping[str, np.ndarray] | None = None,
    ):
        super().__init__(config, ood_arrays)
        self.session = graph if isinstance(graph, OnnxSession) else OnnxSession(graph)
        self._explainer: OnnxSession | None = None

    def _run(
        self,
        u8: np.ndarray,
        meta: np.ndarray | None,
        tta: bool,
        cams: bool,
        session: OnnxSession | None = None,
        blocks: bool = False,
    ) -> list[np.ndarray]:
        x = self.normalize_array(u8)
        n = x.shape[0]
        views = flip_views(x) if tta else [x]
        batch = np.concatenate(views) if len(views) > 1 else x
        if meta is None and self.metadata_encoder is not None:
            meta = self.metadata_array(None, n)
        metas = None if meta is None else np.concatenate([meta] * len(views))
        out = (session or self.session).run({"images": batch, "metadata": metas}, cams=cams, blocks=blocks)
        out[0] = out[0].reshape(len(views), n, -1)
        out[1] = out[1][:n]
        if blocks:
            out[-1] = out[-1][:n]
        return out

    def forward_batch(self, u8: np.ndarray, meta: np.ndarray | None, tta: bool) -> Forward:
        if self.wants_blocks and not self.session.has_blocks:
            raise ModelLoadError(
                "this model's ONNX graph has no block outputs: its OOD score needs them (repackage it)"
            )
        out = self._run(u8, meta, tta, cams=False, blocks=self.wants_blocks)
        return out[0], out[1], (out[2] if self.wants_blocks else None)

    @property
    def explains(self) -> bool:
        """Whether :meth:`explain` can answer (the graph outputs class activation maps)."""
        return self.session.has_cams

    def explain(self, rgb: np.ndarray, metadata: Any = None) -> tuple[np.ndarray, int]:
        """The Grad-CAM heatmap (equal to CAM, :mod:`pipeline.model.cam`) of one (H, W, 3) uint8
        image for its predicted native-level class, at the image's size, and that class's index.
        The class is the prediction with the model's default TTA; the map is the plain view's. Runs
        on a session of its own on the calling thread (one ONNX Runtime thread), so that a caller
        at a low CPU priority explains without taking cores from predictions."""
        if not self.explains:
            raise ModelLoadError("this model's ONNX graph has no class activation maps (its Grad-CAM needs torch)")
        if self._explainer is None:
            self._explainer = OnnxSession(self.session.source, threads=1)
        u8 = self.resize_u8([rgb])
        meta = self.metadata_array(metadata, 1)
        logits, _, cams = self._run(u8, meta, self.default_tta, cams=True, session=self._explainer)
        target = int(np.argmax(self.probabilities(logits)[0]))
        return heatmap(cams[0, target], tuple(np.asarray(rgb).shape[:2]), self.input_size), target


def read_ood(model_dir: Path, config: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """The OOD detector's arrays of a model (``ood.npz``; None when its config has no file), checked
    against the config's ``ood`` entry: :class:`ModelLoadError` naming ``config.json`` when they
    do not fit."""
    entry = config.get("ood")
    arrays = checkpoint.load_arrays(model_dir, OOD_FILE) if (entry or {}).get("file") else None
    if entry:
        try:
            OodDetector.from_config(entry, arrays or {}, 1.0)
        except (ValueError, KeyError) as exc:  # an inconsistent ood entry
            raise ModelLoadError(f"{Path(model_dir) / CONFIG_FILE}: ood: {exc}") from None
    return arrays


def load_packaged(model_dir: Path | str, threads: int | None = None) -> OnnxPredictor:
    """The :class:`OnnxPredictor` of a packaged model's ``model.onnx`` (ONNX Runtime on the CPU,
    ``threads`` cores; default :func:`default_threads`), the folder first checked against its
    ``metadata.json`` (:func:`pipeline.model.bundle.verify`); :class:`ModelLoadError` naming the
    file that is missing or wrong. The service's predictor (torch is never imported)."""
    model_dir = Path(model_dir)
    graph = model_dir / bundle.ONNX_FILE
    if not graph.is_file():
        raise ModelLoadError(f"{graph}: missing (the model was packaged without its ONNX graph)")
    bundle.verify(model_dir)
    cfg = checkpoint.read_config(model_dir)
    arrays = read_ood(model_dir, cfg)
    try:
        session = OnnxSession(graph, threads)
    except Exception as exc:  # ONNX Runtime refuses the file
        raise ModelLoadError(f"{graph}: ONNX Runtime cannot load it ({exc})") from None
    return OnnxPredictor(session, cfg, arrays)


def runnable(model_dir: Path | str) -> bool:
    """Whether :func:`load_packaged` can be tried: the folder has ``model.onnx`` and ONNX Runtime is installed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return (Path(model_dir) / bundle.ONNX_FILE).is_file()
