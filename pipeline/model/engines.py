"""Which engine answers for a packaged model: ONNX Runtime without torch where it can (the
service, its Grad-CAM process), torch otherwise. Apart from :mod:`pipeline.model.runtime` (which
never imports torch) and :mod:`pipeline.model.inference` (which does, and imports the runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.model import runtime


def load_predictor(path: Path, engine: str = "auto", device: str = "cpu", threads: int | None = None) -> Any:
    """The packaged model's predictor: ONNX Runtime on its ``model.onnx`` without torch
    (:func:`pipeline.model.runtime.load_packaged`) on the CPU with engine ``auto`` or ``onnx``;
    otherwise torch (:func:`pipeline.model.inference.load_model`: a GPU, engine ``torch``, or a
    model packaged before its graph was)."""
    if engine in ("auto", "onnx") and device == "cpu" and runtime.runnable(path):
        return runtime.load_packaged(path, threads)
    import torch

    from pipeline.model.inference import load_model

    torch.set_num_threads(threads or runtime.default_threads())
    return load_model(path, device=device, engine=engine)
