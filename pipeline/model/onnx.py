"""The ONNX Runtime engine: the classifier exported in memory to an ONNX graph and run on the CPU.

No second weights file to keep in step: the graph is exported from the very torch model when a
predictor is built (:func:`export_onnx`), and :class:`pipeline.model.inference.Predictor` uses it
only after it reproduced the torch model's outputs on a probe batch. On 2 CPU cores ONNX Runtime
predicts EfficientNet-Lite0 at 112x150 about 1.7x faster than torch at batch 8 and 4x at batch 1.
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from pipeline.model.classifier import LesionClassifier, missing_metadata


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


def export_onnx(model: LesionClassifier, input_size: tuple[int, int], metadata_dim: int | None) -> bytes:
    """The classifier as an ONNX graph (opset 17, dynamic batch): inputs ``images`` (N, 3, H, W)
    float32 [+ ``metadata`` (N, metadata_dim)], outputs ``logits`` and ``embeddings``."""
    h, w = input_size
    wrapped = _EmbedAndHead(model).eval()
    args: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, h, w),)
    names = ["images"]
    if metadata_dim is not None:
        args += (missing_metadata(2, metadata_dim),)
        names.append("metadata")
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapped,
            args,
            buf,
            input_names=names,
            output_names=["logits", "embeddings"],
            dynamic_axes={n: {0: "batch"} for n in names + ["logits", "embeddings"]},
            opset_version=17,
            dynamo=False,
        )
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
