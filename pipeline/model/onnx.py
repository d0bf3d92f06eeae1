"""Exporting the classifier to an ONNX graph (torch side; the graph is run by
:class:`pipeline.model.runtime.OnnxSession`, which needs no torch).

Two uses: :class:`pipeline.model.inference.Predictor` exports its model in memory for the ``onnx``
engine, and packaging writes ``model.onnx`` into the packaged model
(:func:`pipeline.model.inference.write_onnx`), so that the service answers with ONNX Runtime alone.
Either graph is used only after it reproduced the torch model's outputs on a probe batch
(:data:`TOLERANCE`). On 2 CPU cores ONNX Runtime predicts EfficientNet-Lite0 at 112x150 about 1.7x
faster than torch at batch 8 and 4x at batch 1.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.model.classifier import LesionClassifier, missing_metadata

#: Largest absolute difference (probabilities, embeddings and normalised activation maps) an ONNX
#: graph may show against the torch model on the probe batch before it is refused. Float32
#: reorderings give about 1e-6.
TOLERANCE = 1e-4
OPSET = 17


class _Graph(nn.Module):
    """``(images[, metadata]) -> (logits, embeddings[, cams], blocks)``: what the ONNX graph computes.

    ``cams`` (N, K, h, w): each class's activation map ``sum_k w_ck A_k`` over the last feature map
    ``A`` and the head's image weights (:mod:`pipeline.model.cam`), for a model whose pooled
    vector reaches the head unchanged. ``blocks`` (N, D): the pooled outputs of four blocks of the
    backbone (:meth:`LesionClassifier.blocks`), for the multi-layer OOD score."""

    def __init__(self, model: LesionClassifier, cams: bool):
        super().__init__()
        self.model = model
        self.cams = cams

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        m = self.model
        pooled: list[torch.Tensor] = []
        hooks = [
            b.register_forward_hook(lambda _m, _i, o: pooled.append(o.float().mean(dim=(2, 3)))) for b in m.blocks()
        ]
        try:
            features = m.backbone(x)
        finally:
            for hook in hooks:
                hook.remove()
        emb = m.neck(m.pool(features).flatten(1))
        if m.meta is not None:
            emb = torch.cat([emb, m.meta(metadata.to(emb.dtype))], dim=1)
        logits = m.head(emb)
        blocks = torch.cat(pooled, dim=1)
        if not self.cams:
            return logits, emb, blocks
        weights = m.head.weight[:, : features.shape[1]]
        return logits, emb, torch.einsum("nchw,kc->nkhw", features, weights), blocks


def onnx_available() -> bool:
    """True when ONNX Runtime and the ONNX exporter's ``onnx`` package can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def has_cams(model: LesionClassifier) -> bool:
    """Whether CAM from the head's weights equals the model's Grad-CAM: its pooled vector reaches
    the head unchanged (no normalising neck, such as ConvNeXt's LayerNorm)."""
    return isinstance(model.neck, nn.Identity)


def export_onnx(
    model: LesionClassifier, input_size: tuple[int, int], metadata_dim: int | None, cams: bool = False
) -> bytes:
    """The classifier as an ONNX graph (opset 17, dynamic batch): inputs ``images`` (N, 3, H, W)
    float32 [+ ``metadata`` (N, metadata_dim)], outputs ``logits``, ``embeddings`` [+ ``cams``] and
    ``blocks``."""
    h, w = input_size
    wrapped = _Graph(model, cams).eval()
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, h, w),)
    names = ["images"]
    if metadata_dim is not None:
        args += (missing_metadata(2, metadata_dim),)
        names.append("metadata")
    outputs = ["logits", "embeddings"] + (["cams"] if cams else []) + ["blocks"]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapped,
            args,
            buf,
            input_names=names,
            output_names=outputs,
            dynamic_axes={n: {0: "batch"} for n in names + outputs},
            opset_version=OPSET,
            dynamo=False,
        )
    return buf.getvalue()


def _normalised(maps: np.ndarray) -> np.ndarray:
    """Each (h, w) map after ReLU and min-max, as :func:`pipeline.model.cam.heatmap` treats it."""
    m = np.maximum(maps, 0.0)
    m = m - m.min(axis=(-2, -1), keepdims=True)
    return m / (1e-7 + m.max(axis=(-2, -1), keepdims=True))


def disagreement(predictor: Any, session: Any) -> float:
    """Largest difference between ``session`` (a :class:`pipeline.model.runtime.OnnxSession`) and
    the torch model of ``predictor`` on a seeded probe batch: softmax probabilities, embeddings
    and, when the graph has them, the normalised class activation maps and (relative to their
    largest value) the pooled block outputs."""
    gen = torch.Generator().manual_seed(0)
    h, w = predictor.input_size
    u8 = torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8, generator=gen)
    x = predictor.normalize(u8)
    meta = predictor.encode_metadata(None, 3)
    feed = {"images": x.cpu().numpy(), "metadata": None if meta is None else meta.cpu().numpy()}
    got = session.run(feed, cams=session.has_cams, blocks=session.has_blocks)
    with torch.no_grad():
        ref = _Graph(predictor.model, session.has_cams).eval()(x, meta)
    ref = [t.float().cpu().numpy() for t in ref][: len(got)]

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    diffs = [np.abs(softmax(got[0]) - softmax(ref[0])).max(), np.abs(got[1] - ref[1]).max()]
    if session.has_cams:
        diffs.append(np.abs(_normalised(got[2]) - _normalised(ref[2])).max())
    if session.has_blocks:
        diffs.append(np.abs(got[-1] - ref[-1]).max() / (np.abs(ref[-1]).max() + 1e-6))
    return float(max(diffs))
