"""Helpers for the registry/service tests and the serving benchmark: an untrained model directory
in exactly the format the train stage writes (``model.pt`` state_dict + ``config.json`` from
:func:`pipeline.model.checkpoint.model_config`), and the evaluate outputs ``package()`` reads
(``operating_point.json``, ``gates.json``, ``metrics.json``), without training or evaluating."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.core import lineage, params
from pipeline.core.fsutil import write_json
from pipeline.model import backbones, checkpoint, classifier, training
from pipeline.model.metadata import MetadataEncoder

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def write_model_dir(
    dest: Path,
    *,
    backbone: str = "small_cnn",
    input_size: tuple[int, int] = (48, 64),
    metadata_fusion: bool = False,
    seed: int = 0,
    tta: bool = False,
) -> Path:
    """An untrained (randomly initialised, seeded) model at ``dest`` with train's config.json."""
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
    cfg = checkpoint.model_config(
        p, tax, arch, backbones.backbone_spec(backbone).preprocessing(input_size), vocabulary, lin, result
    )
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), dest / checkpoint.MODEL_FILE)
    write_json(dest / checkpoint.CONFIG_FILE, cfg)
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
    md5 = lineage.file_md5(model_dir / checkpoint.MODEL_FILE)
    op = {
        "threshold": threshold,
        "target_sensitivity": 0.95,
        "chosen_on": "val",
        "model_md5": md5,
        "positive_class": "malignant",
        "rule": "malignant if p(malignant) >= threshold",
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
    return {"operating_point": op, "gates": verdict, "metrics": mets, "model_md5": md5}
