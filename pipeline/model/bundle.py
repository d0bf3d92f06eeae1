"""A model folder: the one owner of its files, its identity, its threshold and its schema.

Every consumer (evaluation, monitoring, the registry, the service, audit, the CLI, the flows) asks
this module where a model's parts are instead of writing a file name. The train stage writes the
first three files; packaging (:mod:`pipeline.registry.package`) adds the rest, then
``metadata.json``, the folder's written schema (in the spirit of a MONAI bundle)::

    model.pt                 the weights: a state_dict, loaded with weights_only=True (checkpoint)
    config.json              architecture, classes, taxonomy, preprocessing, calibration, OOD, lineage
    ood.npz                  the out-of-distribution detector's statistics (plain arrays)
    operating_point.json     the binary threshold and the decision rule (stage evaluate)
    gates.json scores.json confidence.json   the evaluation's verdict, headline numbers and CIs
    lesionflow.json          the full lineage record (git, data, dvc.lock, params, metrics)
    model.onnx               the same network as an ONNX graph (+ class activation maps), checked
                             against model.pt when packaged: the service runs it without torch
    metadata.json            inputs, outputs, taxonomy, lineage, every file with its sha256
    reference/               the drift-monitoring reference profile (stage reference)
    retrieval/               the similar-cases index (stage retrieval)
    external/                external validations recorded later (lesionflow validate-external)
    sites/                   operating points per site recorded later (lesionflow site add,
                             pipeline.model.sites)

:func:`verify` checks a folder against its ``metadata.json`` (every listed file present, same
size and sha256) and is called when a packaged model is loaded
(:func:`pipeline.model.inference.load_model`): a model altered after packaging is refused, naming
the file. A model's identity is :func:`model_md5` (of ``model.pt``, what every lineage records)
and :func:`fingerprint` (of everything that changes its answers). The decision rule itself is
:func:`pipeline.core.predictions.refers`; :class:`OperatingPoint` holds the threshold it is
applied at. NumPy-free and torch-free: the registry and the service's model lookup read it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core import fsutil
from pipeline.core.errors import LesionflowError
from pipeline.core.lineage import file_md5
from pipeline.core.predictions import refers, rule_text

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
OOD_FILE = "ood.npz"
OPERATING_POINT_FILE = "operating_point.json"
GATES_FILE = "gates.json"
SCORES_FILE = "scores.json"  # every headline test number (the evaluate stage's reports/evaluate/scores.json)
CONFIDENCE_FILE = "confidence.json"
RECORD_FILE = "lesionflow.json"
METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"  # written when packaged (pipeline.model.inference.write_onnx)
CHAMPION_FILE = "champion.json"  # what the retraining flow's champion export adds: tag, md5s, threshold
REFERENCE_DIR = "reference"
#: In REFERENCE_DIR: the profile's schema (with the statistics' feature configuration) and its projection.
REFERENCE_SCHEMA_FILE = "profile.json"
REFERENCE_PROJECTION_FILE = "projection.npy"
RETRIEVAL_DIR = "retrieval"
EXTERNAL_DIR = "external"
SITES_DIR = "sites"
MONITORING_DIR = "monitoring"  # drift checks run against the model (pipeline.registry.trace)

#: What a trained model is (the train stage's output).
TRAINED_FILES = (MODEL_FILE, CONFIG_FILE)
#: Files beside the weights that change what a model answers.
ANSWER_FILES = (MODEL_FILE, CONFIG_FILE, OOD_FILE)
#: The evaluation's files a packaged model carries (from the evaluate stage's reports).
EVALUATION_FILES = (GATES_FILE, SCORES_FILE, CONFIDENCE_FILE)
#: What a model needs to be served (and exported as the champion); ``ood.npz`` when it has one.
SERVING_FILES = (MODEL_FILE, CONFIG_FILE, OPERATING_POINT_FILE)
#: Schema identifier of ``metadata.json``.
SCHEMA = "lesionflow-bundle/1"


class ModelLoadError(LesionflowError, RuntimeError):
    """A model folder that cannot be loaded or does not match its schema; the message names the file."""


# ----------------------------------------------------------------------------------------------
# identity


def model_md5(folder: Path | str, missing_ok: bool = False) -> str | None:
    """md5 of the folder's ``model.pt``: the identity every lineage record carries. Without weights:
    None when ``missing_ok``, else :class:`ModelLoadError`."""
    weights = Path(folder) / MODEL_FILE
    if not weights.exists():
        if missing_ok:
            return None
        raise ModelLoadError(f"{weights}: model weights not found (run the train stage first: dvc repro train)")
    return file_md5(weights)


def fingerprint(folder: Path | str) -> str | None:
    """The identity of what a model answers: md5 over ``model.pt``, ``config.json`` (calibration, OOD
    threshold, size limits, TTA, lineage) and ``ood.npz`` when present; None without weights. Two
    folders with the same fingerprint serve the same answers."""
    d = Path(folder)
    if not (d / MODEL_FILE).exists():
        return None
    h = hashlib.md5()
    for name in ANSWER_FILES:
        if (d / name).exists():
            h.update(f"{name}:{file_md5(d / name)};".encode())
    return h.hexdigest()


def answer_files(folder: Path | str) -> list[Path]:
    """The files of :data:`ANSWER_FILES` the folder holds (what a copy of the model must take along)."""
    return [Path(folder) / name for name in ANSWER_FILES if (Path(folder) / name).exists()]


# ----------------------------------------------------------------------------------------------
# the operating point


@dataclass(frozen=True)
class OperatingPoint:
    """The binary threshold a model decides at, and how it was chosen (``operating_point.json``)."""

    threshold: float
    positive_class: str = "malignant"
    target_sensitivity: float | None = None
    record: Mapping[str, Any] | None = None

    @property
    def rule(self) -> str:
        return rule_text(self.positive_class)

    def refer(self, p_malignant: Any) -> Any:
        """:func:`pipeline.core.predictions.refers` at this threshold (a bool, or an array of them)."""
        out = refers(p_malignant, self.threshold)
        return bool(out) if out.ndim == 0 else out

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: Path | str) -> OperatingPoint:
        """From an ``operating_point.json`` document; :class:`ModelLoadError` naming ``source`` when
        its threshold is missing or outside [0, 1]."""
        try:
            threshold = float(record["threshold"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{source}: no numeric 'threshold'") from None
        if not 0.0 <= threshold <= 1.0:
            raise ModelLoadError(f"{source}: threshold {threshold} outside [0, 1]")
        target = record.get("target_sensitivity")
        return cls(
            threshold,
            str(record.get("positive_class", "malignant")),
            None if target is None else float(target),
            dict(record),
        )


def operating_point(folder: Path | str) -> OperatingPoint | None:
    """The folder's operating point, or None when it has none (an unevaluated model)."""
    path = Path(folder) / OPERATING_POINT_FILE
    record = fsutil.read_json(path)
    return None if record is None else OperatingPoint.from_record(record, path)


def require_operating_point(folder: Path | str) -> OperatingPoint:
    """:func:`operating_point`, or :class:`ModelLoadError` saying how to get one."""
    op = operating_point(folder)
    if op is None:
        raise ModelLoadError(
            f"{Path(folder) / OPERATING_POINT_FILE}: missing: a packaged model has one (lesionflow run, or "
            "--model TAG of a packaged model)"
        )
    return op


# ----------------------------------------------------------------------------------------------
# the schema (metadata.json)


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path, skip: Iterable[str]) -> dict[str, dict[str, Any]]:
    skipped = set(skip)
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.split("/")[0] not in skipped:
            out[rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    return out


def _inputs(config: Mapping[str, Any]) -> dict[str, Any]:
    pre = config.get("preprocessing") or {}
    vocab = config.get("metadata_vocabulary") or {}
    fusion = bool((config.get("architecture") or {}).get("metadata"))
    return {
        "image": {
            "formats": ["JPEG", "PNG"],
            "channels": "RGB",
            "input_size": pre.get("input_size"),
            "resize": pre.get("resize"),
            "normalisation": {"scale": pre.get("scale"), "mean": pre.get("mean"), "std": pre.get("std")},
            "limits": config.get("input_limits"),
        },
        "metadata": {
            "used": fusion,
            "age": {"min": vocab.get("age_min"), "max": vocab.get("age_max")},
            "sex": vocab.get("sexes"),
            "localization": vocab.get("localizations"),
        },
    }


def _outputs(config: Mapping[str, Any], op: OperatingPoint | None) -> dict[str, Any]:
    ood = config.get("ood") or {}
    return {
        "native_level": config.get("target_level"),
        "classes": config.get("classes"),
        "taxonomy": config.get("taxonomy"),
        "calibration": {"temperature": (config.get("calibration") or {}).get("temperature")},
        "decision": None if op is None else {"threshold": op.threshold, "rule": op.rule},
        "out_of_distribution": {"method": ood.get("method"), "threshold": ood.get("threshold")} if ood else None,
    }


def describe(
    folder: Path | str, *, name: str, tag: str, lineage: Mapping[str, Any], engines: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``metadata.json`` document of a complete model folder: what it takes and gives, where it
    comes from, the graphs it can be run with besides ``model.pt`` (``engines``) and every file it
    holds with its size and sha256 (``external/``, ``sites/`` and ``monitoring/`` are left out:
    records added after packaging)."""
    d = Path(folder)
    config = json.loads((d / CONFIG_FILE).read_text())
    return {
        "schema": SCHEMA,
        "name": name,
        "tag": tag,
        "model_md5": model_md5(d),
        "inputs": _inputs(config),
        "outputs": _outputs(config, operating_point(d)),
        "lineage": dict(lineage),
        "engines": dict(engines or {}),
        "files": _files(d, skip=(METADATA_FILE, EXTERNAL_DIR, SITES_DIR, MONITORING_DIR)),
    }


def write_metadata(
    folder: Path | str, *, name: str, tag: str, lineage: Mapping[str, Any], engines: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write the folder's ``metadata.json`` (:func:`describe`); returns it."""
    doc = describe(folder, name=name, tag=tag, lineage=lineage, engines=engines)
    fsutil.write_json(Path(folder) / METADATA_FILE, doc, sort_keys=False)
    return doc


def read_metadata(folder: Path | str) -> dict[str, Any] | None:
    """The folder's ``metadata.json`` (None for an unpackaged model)."""
    return fsutil.read_json(Path(folder) / METADATA_FILE)


def verify(folder: Path | str, hashes: bool = True) -> dict[str, Any] | None:
    """Check a packaged folder against its ``metadata.json``: a known schema, every listed file
    present with its size (and, with ``hashes``, its sha256), and ``model.pt`` with the md5 the
    schema names. Returns the document (None for an unpackaged folder, which has none);
    :class:`ModelLoadError` naming the first file that differs."""
    d = Path(folder)
    doc = read_metadata(d)
    if doc is None:
        return None
    if doc.get("schema") != SCHEMA:
        raise ModelLoadError(f"{d / METADATA_FILE}: schema {doc.get('schema')!r} is not {SCHEMA!r}")
    for rel, entry in (doc.get("files") or {}).items():
        path = d / rel
        if not path.is_file():
            raise ModelLoadError(f"{path}: listed in {METADATA_FILE} but missing")
        if path.stat().st_size != entry.get("bytes") or (hashes and sha256(path) != entry.get("sha256")):
            raise ModelLoadError(f"{path}: differs from the file packaged with this model ({METADATA_FILE})")
    if model_md5(d) != doc.get("model_md5"):
        raise ModelLoadError(f"{d / MODEL_FILE}: md5 differs from {doc.get('model_md5')} in {METADATA_FILE}")
    return doc
