"""Helpers for the registry/service tests and the serving benchmark: an untrained model directory
in exactly the format the train stage writes (``model.pt`` state_dict + ``config.json`` from
:func:`pipeline.model.checkpoint.model_config`), and the evaluate outputs ``package()`` reads
(``operating_point.json``, ``gates.json``, ``metrics.json``, ``scores.json``), without training or evaluating."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core import lineage, params
from pipeline.core.fsutil import write_json
from pipeline.model import backbones, bundle, checkpoint, classifier, training, trust
from pipeline.model.inference import Predictor
from pipeline.model.metadata import MetadataEncoder

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: How many real images a test model's image-quality checks are fitted on.
QUALITY_IMAGES = 1500


def quality_sample() -> list[np.ndarray]:
    """:data:`QUALITY_IMAGES` real HAM10000 images (a fixed sample), decoded."""
    import pandas as pd

    from pipeline.core.images import decode_rgb

    meta = pd.read_csv(PROJECT_ROOT / "data" / "HAM10000_metadata.csv")
    ids = meta["image_id"].sample(QUALITY_IMAGES, random_state=1)
    return [decode_rgb(PROJECT_ROOT / "data" / "images" / f"{i}.jpg") for i in ids]


def write_model_dir(
    dest: Path,
    *,
    backbone: str = "small_cnn",
    input_size: tuple[int, int] = (48, 64),
    metadata_fusion: bool = False,
    seed: int = 0,
    tta: bool = False,
    trust_images: Sequence[np.ndarray] | None = None,
    trust_labels: Sequence[str] | None = None,
) -> Path:
    """An untrained (randomly initialised, seeded) model at ``dest`` with train's config.json.

    With ``trust_images`` (RGB arrays) and their diagnoses ``trust_labels``, the model also gets
    what the train stage fits after training (:mod:`pipeline.model.trust`): the temperature and
    the OOD detector, here fitted on those images (as both train and val), and the image-quality
    checks, fitted on :data:`QUALITY_IMAGES` real images as the training split would give them
    (the 0.1% tails of 80 images would refuse a tenth of them)."""
    tax = params.load_taxonomy(PROJECT_ROOT / "params.yaml")
    vocabulary = params.load_section("metadata", PROJECT_ROOT / "params.yaml")
    p = params.from_dict(
        params.TrainParams,
        {
            "backbone": backbone,
            "pretrained": False,
            "input_size": list(input_size),
            "metadata_fusion": metadata_fusion,
            "tta": tta,
            "epochs": 1,
            "warmup_epochs": 0.0,
        },
        "train",
    )
    classes = list(tax.classes(p.target_level))
    meta = MetadataEncoder.from_params(vocabulary) if metadata_fusion else None
    torch.manual_seed(seed)
    model = classifier.build_model(
        backbone, len(classes), pretrained=False, input_size=input_size, dropout=p.dropout, metadata=meta
    )
    result = {
        "device": training.describe_device(torch.device("cpu"), 1),
        "best_epoch": 0,
        "epochs_run": 0,
        "val_balanced_accuracy": float("nan"),
    }
    lin = lineage.lineage(params={"train": params.to_dict(p)}, dvc_file=PROJECT_ROOT / "data.dvc")
    arch = classifier.architecture(backbone, len(classes), input_size, p.dropout, meta)
    limits = params.load_section("validate", PROJECT_ROOT / "params.yaml").size_limits()
    cfg = checkpoint.model_config(
        p, tax, arch, backbones.backbone_spec(backbone).preprocessing(input_size), vocabulary, limits, lin, result
    )
    arrays = {}
    if trust_images is not None:
        predictor = Predictor(model, cfg, "cpu", engine="torch")
        u8 = predictor.resize(list(trust_images))
        split = trust.SplitInputs(u8, None, tax.encode(list(trust_labels), p.target_level))
        fitted = trust.fit_trust(predictor, split, split, p.trust, 64)
        wide = trust.SplitInputs(predictor.resize(quality_sample()), None, np.zeros(0))
        checks = trust.fit_quality(predictor, wide, split, p.trust.quality_quantile)
        cfg.update(calibration=fitted.calibration, ood=fitted.ood, quality=checks)
        arrays = fitted.arrays
    checkpoint.save(dest, model.state_dict(), cfg, arrays)
    return dest


def write_evaluation(
    model_dir: Path,
    evaluate_dir: Path,
    reports_dir: Path,
    *,
    threshold: float = 0.3,
    passed: bool = True,
    auc: float = 0.9,
) -> dict[str, Any]:
    """The files evaluate writes that packaging reads, for the model in ``model_dir``."""
    md5 = bundle.model_md5(model_dir)
    op = {
        "threshold": threshold,
        "target_sensitivity": 0.95,
        "chosen_on": "val",
        "model_md5": md5,
        "positive_class": "malignant",
        "rule": "malignant if p(malignant) >= threshold",
        # what evaluate reports at the threshold (made-up counts of a 300-image split)
        "val": {
            "sensitivity": 0.95,
            "specificity": 0.5,
            "ppv": 0.3,
            "npv": 0.98,
            "tp": 57,
            "fn": 3,
            "fp": 120,
            "tn": 120,
        },
        "test": {
            "sensitivity": 0.93,
            "specificity": 0.52,
            "ppv": 0.31,
            "npv": 0.97,
            "tp": 56,
            "fn": 4,
            "fp": 115,
            "tn": 125,
        },
    }
    verdict = {
        "passed": passed,
        "failed": [] if passed else ["absolute:binary.roc_auc"],
        "champion_present": False,
        "note": "",
        "gates": [
            {
                "gate": "absolute",
                "metric": "binary.roc_auc",
                "direction": "min",
                "value": auc,
                "threshold": 0.85,
                "passed": passed,
                "note": "",
            }
        ],
        "model_md5": md5,
    }
    mets = {
        "binary": {"roc_auc": auc},
        "dx": {"balanced_accuracy": 0.6},
        "operating_point": {"threshold": threshold},
        "gates": {"passed": passed, "n_failed": 0 if passed else 1},
    }
    write_json(evaluate_dir / "operating_point.json", op)
    write_json(reports_dir / "gates.json", verdict)
    write_json(reports_dir / "metrics.json", mets)
    write_json(reports_dir / "scores.json", mets)
    return {"operating_point": op, "gates": verdict, "metrics": mets, "model_md5": md5}
