"""A trained model's weights and configuration: ``model.pt`` (a ``state_dict``, loaded with
``weights_only=True``: nothing is ever unpickled) plus ``config.json`` (everything else, plain
JSON). The one owner of their format; the folder they live in (its file names, identity and
schema) is :mod:`pipeline.model.bundle`'s.

``config.json`` holds the architecture (enough to rebuild the model without downloading anything),
the classes and taxonomy, the preprocessing, the metadata vocabulary and image sizes the model
accepts, the inference settings (TTA), the calibration temperature and the out-of-distribution
detector (its statistics in ``ood.npz``), every training parameter, the validation metrics, the device and the
full lineage (git commit, data md5, params, split-file md5s, library versions): torchvision's
"the full configuration saved with every checkpoint".

torch is imported only where weights are read or written, so the registry can read a model's
config without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import fsutil
from pipeline.core.formats import SizeLimits
from pipeline.core.params import MetadataParams, TrainParams, to_dict
from pipeline.core.taxonomy import Taxonomy
from pipeline.model.bundle import CONFIG_FILE, MODEL_FILE, ModelLoadError

__all__ = ["FORMAT", "ModelLoadError", "load_arrays", "load_state", "model_config", "read_config", "save"]

FORMAT = "lesionflow-model/1"
#: Keys every config.json has.
REQUIRED_KEYS = ("architecture", "taxonomy", "target_level", "classes", "preprocessing")


def model_config(
    p: TrainParams,
    tax: Taxonomy,
    architecture: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    vocabulary: MetadataParams,
    input_limits: SizeLimits,
    lineage: Mapping[str, Any],
    result: Mapping[str, Any],
) -> dict[str, Any]:
    """The config.json of a model trained with ``p`` (``result``: the training's final metrics;
    ``input_limits``: the image sizes its training data met). The train stage adds
    ``calibration`` and ``ood`` (:mod:`pipeline.model.trust`)."""
    from pipeline.model.augment import TTA_VIEWS

    return {
        "format": FORMAT,
        "architecture": dict(architecture),
        "target_level": p.target_level,
        "classes": list(tax.classes(p.target_level)),
        "taxonomy": tax.to_dict(),
        "preprocessing": {
            **preprocessing,
            "resize": "pipeline.core.images.fit_to_size: turn portrait to landscape, bilinear resize to input_size",
            "channels": "RGB",
            "scale": "uint8 / 255 then (x - mean) / std",
        },
        "metadata_vocabulary": to_dict(vocabulary),
        "input_limits": input_limits.to_dict(),
        "inference": {"tta": p.tta, "tta_views": list(TTA_VIEWS) if p.tta else []},
        "train_params": to_dict(p),
        "metrics": {k: v for k, v in result.items() if k.startswith("val_") or k in ("best_epoch", "epochs_run")},
        "device": result.get("device"),
        "lineage": dict(lineage),
    }


def save(
    model_dir: Path | str,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """Write ``model.pt`` + ``config.json`` (+ ``arrays``: file name -> named NumPy arrays, saved as
    ``.npz``, e.g. the OOD statistics) into ``model_dir``, replaced whole only when everything is
    written (a crash leaves the previous model in place)."""
    import torch

    with fsutil.staged_dir(model_dir) as stage:
        torch.save(dict(state), stage / MODEL_FILE)
        for name, named in (arrays or {}).items():
            np.savez(stage / name, **dict(named))
        fsutil.write_json(stage / CONFIG_FILE, config)
    return Path(model_dir)


def load_arrays(model_dir: Path | str, name: str) -> dict[str, np.ndarray]:
    """The named arrays of ``model_dir/name`` (an ``.npz`` read with ``allow_pickle=False``)."""
    path = Path(model_dir) / name
    if not path.exists():
        raise ModelLoadError(f"{path}: not found (the model's {CONFIG_FILE} refers to it)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot be read as plain arrays ({exc})") from None


def read_config(model_dir: Path | str) -> dict[str, Any]:
    """``config.json`` of a model directory, checked for the keys every model has."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        raise ModelLoadError(f"{path}: model config not found (train a model first: dvc repro train)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    for key in REQUIRED_KEYS:
        if key not in cfg:
            raise ModelLoadError(f"{path}: missing key {key!r}")
    return cfg


def load_state(model_dir: Path | str) -> dict[str, Any]:
    """The ``state_dict`` of ``model.pt`` (``weights_only=True``: tensors only, never unpickled objects)."""
    import torch

    weights = Path(model_dir) / MODEL_FILE
    if not weights.exists():
        raise ModelLoadError(f"{weights}: model weights not found")
    try:
        return torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or not a plain state_dict
        raise ModelLoadError(f"{weights}: cannot be loaded as a state_dict ({exc})") from None
