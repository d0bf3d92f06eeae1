"""Packaging: a trained model that passed every evaluation gate goes into the model store with what
an auditor needs to trace it back, and becomes the champion.

    tag = package(Path("artifacts/model"), Path("artifacts/evaluate"), Path("reports/evaluate"))

The stored folder (:mod:`pipeline.model.bundle`) holds the model's files, its operating point, the
evaluation's verdict and numbers, the reference profile and the retrieval index of this very
model, ``lesionflow.json`` (the full lineage record: data version, git state, ``dvc.lock`` stage
hashes, params, test metrics with CIs, verdict, threshold, libraries) and ``metadata.json`` (the
folder's schema, every file with its sha256) and ``model.onnx``, the same network exported for
ONNX Runtime and checked against the weights, which the service answers with.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import fsutil, lineage
from pipeline.core.errors import LesionflowError
from pipeline.core.layout import Layout
from pipeline.core.machine import describe as describe_machine
from pipeline.model import bundle
from pipeline.registry.store import MODEL_NAME, RegistryError, model_store, plain


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return fsutil.require_json(path, what, "run the train and evaluate stages first: dvc repro evaluate")
    except LesionflowError as exc:
        raise RegistryError(str(exc)) from None


def dvc_lock_hashes(lock_file: Path) -> dict[str, Any]:
    """``{stage: {"cmd", "deps": {path: md5}, "outs": {path: md5}}}`` from ``dvc.lock`` (empty if absent)."""
    if not lock_file.exists():
        return {}
    doc = yaml.safe_load(lock_file.read_text()) or {}
    out: dict[str, Any] = {}
    for stage, entry in (doc.get("stages") or {}).items():
        entry = entry or {}
        out[stage] = {
            "cmd": entry.get("cmd"),
            **{
                kind: {d.get("path"): d.get("md5") for d in entry.get(kind) or [] if isinstance(d, dict)}
                for kind in ("deps", "outs")
            },
        }
    return out


@dataclass
class Evaluated:
    """A trained model and the evaluation of that very model, checked for packaging."""

    model_dir: Path
    evaluate_dir: Path
    reports_dir: Path
    config: dict[str, Any]
    operating_point: bundle.OperatingPoint
    verdict: dict[str, Any]
    metrics: dict[str, Any]
    confidence: dict[str, Any]
    model_md5: str

    @property
    def threshold(self) -> float:
        return self.operating_point.threshold


def _check_verdict(verdict: dict[str, Any], source: Path) -> None:
    if verdict.get("passed") is not True:
        failed = ", ".join(verdict.get("failed") or []) or "verdict not passed"
        raise RegistryError(
            f"{source}: the model failed its gates ({failed}); it is not packaged and the champion stays as it is"
        )


def load_evaluated(model_dir: Path, evaluate_dir: Path, reports_dir: Path) -> Evaluated:
    """Read what packaging needs and refuse (:class:`RegistryError`) a model whose gate verdict did
    not pass, whose evaluation was of another model (md5 mismatch) or whose threshold is unusable."""
    try:
        model_md5 = bundle.model_md5(model_dir)
    except bundle.ModelLoadError as exc:
        raise RegistryError(str(exc)) from None
    op_file = evaluate_dir / bundle.OPERATING_POINT_FILE
    op = _read_json(op_file, "operating point")
    verdict_file = reports_dir / bundle.GATES_FILE
    verdict = _read_json(verdict_file, "gate verdict")
    _check_verdict(verdict, verdict_file)
    for source, doc in ((op_file, op), (verdict_file, verdict)):
        evaluated = doc.get("model_md5")
        if evaluated is not None and evaluated != model_md5:
            raise RegistryError(
                f"{source}: evaluated model md5 {evaluated} but {model_dir / bundle.MODEL_FILE} has md5 "
                f"{model_md5}: re-run the evaluate stage on this model before packaging"
            )
    try:
        point = bundle.OperatingPoint.from_record(op, op_file)
    except bundle.ModelLoadError as exc:
        raise RegistryError(str(exc)) from None
    return Evaluated(
        model_dir,
        evaluate_dir,
        reports_dir,
        _read_json(model_dir / bundle.CONFIG_FILE, "model config"),
        point,
        verdict,
        _read_json(reports_dir / bundle.SCORES_FILE, "test metrics"),
        fsutil.read_json(reports_dir / bundle.CONFIDENCE_FILE) or {},
        model_md5,
    )


def lineage_record(ev: Evaluated, root: Path) -> dict[str, Any]:
    """The package's full record (``lesionflow.json``): data version, git state, ``dvc.lock``
    stage hashes, params, test metrics and CIs, verdict, operating point, model, libraries and the
    machine that packaged it (``packaged_on``)."""
    from pipeline.core import params

    layout = Layout(root)
    arch = ev.config.get("architecture") or {}
    return plain(
        {
            "model_md5": ev.model_md5,
            "data": lineage.data_version(layout.data_pointer),
            "git": lineage.git_state(root),
            "dvc_lock": dvc_lock_hashes(layout.dvc_lock),
            "params": params.read_yaml(layout.params_file) if layout.params_file.exists() else {},
            "metrics": ev.metrics,
            "confidence": ev.confidence,
            "gates": ev.verdict,
            "operating_point": dict(ev.operating_point.record or {}),
            "threshold": ev.threshold,
            "model": {
                "backbone": arch.get("backbone"),
                "input_size": arch.get("input_size"),
                "target_level": ev.config.get("target_level"),
                "classes": ev.config.get("classes"),
                "format": ev.config.get("format"),
                "train_lineage": ev.config.get("lineage"),
            },
            "sources": {
                "model_dir": str(ev.model_dir),
                "evaluate_dir": str(ev.evaluate_dir),
                "reports_dir": str(ev.reports_dir),
            },
            "packaged_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "libraries": lineage.library_versions(),
            "packaged_on": describe_machine(),
        }
    )


def _labels(record: dict[str, Any]) -> dict[str, str]:
    """The key facts as BentoML labels (searchable in ``bentoml models list``)."""
    return {
        "data_md5": str(record["data"].get("md5")),
        "git_commit": str(record["git"].get("commit")),
        "git_dirty": str(record["git"].get("dirty")).lower(),
        "model_md5": record["model_md5"],
        "gates": "passed",
        "threshold": f"{record['threshold']:.6g}",
        "backbone": str(record["model"]["backbone"]),
        "target_level": str(record["model"]["target_level"]),
    }


def _bentoml_metadata(obj: Any) -> Any:
    """BentoML metadata refuses None: drop None values from dicts, write "null" in lists (the full
    record, with its None values, is ``lesionflow.json`` beside the model files)."""
    if isinstance(obj, dict):
        return {str(k): _bentoml_metadata(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return ["null" if v is None else _bentoml_metadata(v) for v in obj]
    return obj


def copy_model(ev: Evaluated, dest: Path, root: Path) -> None:
    """The files of a packaged model into ``dest``: the model's answer files, its operating point, the
    evaluation's files and, when built for this very model, the reference profile and retrieval
    index (stages ``reference`` and ``retrieval``)."""
    for path in bundle.answer_files(ev.model_dir):
        shutil.copy2(path, dest / path.name)
    shutil.copy2(ev.evaluate_dir / bundle.OPERATING_POINT_FILE, dest / bundle.OPERATING_POINT_FILE)
    for name in bundle.EVALUATION_FILES:
        if (ev.reports_dir / name).exists():
            shutil.copy2(ev.reports_dir / name, dest / name)
    from pipeline.model.retrieval import index_model_md5
    from pipeline.monitoring.profile import profile_model_md5

    layout = Layout(root)
    if profile_model_md5(layout.reference_dir) == ev.model_md5:
        shutil.copytree(layout.reference_dir, dest / bundle.REFERENCE_DIR)
    if index_model_md5(layout.retrieval_dir) == ev.model_md5:
        shutil.copytree(layout.retrieval_dir, dest / bundle.RETRIEVAL_DIR)


def package(model_dir: Path, evaluate_dir: Path, reports_dir: Path, *, project_root: Path = Path(".")) -> str:
    """Save the evaluated model of ``model_dir`` into the BentoML model store; return its tag.

    Reads ``model_dir`` (weights, config, OOD statistics), ``evaluate_dir/operating_point.json`` and
    the evaluation's files in ``reports_dir``. Refuses (:class:`RegistryError`) a model whose gate
    verdict did not pass, or whose evaluation was of another model (md5 mismatch), so the store only
    ever holds gated models and the newest one is the champion.
    """
    import bentoml

    root = Path(project_root)
    ev = load_evaluated(Path(model_dir), Path(evaluate_dir), Path(reports_dir))
    record = lineage_record(ev, root)
    with bentoml.models.create(
        MODEL_NAME, labels=_labels(record), metadata=_bentoml_metadata(record), _model_store=model_store()
    ) as m:
        dest = Path(m.path)
        copy_model(ev, dest, root)
        fsutil.write_json(dest / bundle.RECORD_FILE, {"tag": str(m.tag), **record})
        if bundle.model_md5(dest) != ev.model_md5:  # changed while copying
            raise RegistryError(f"{ev.model_dir / bundle.MODEL_FILE}: changed while being packaged; try again")
        summary = {
            "data_md5": record["data"].get("md5"),
            "git_commit": record["git"].get("commit"),
            "git_dirty": record["git"].get("dirty"),
            "packaged_at": record["packaged_at"],
            "record": bundle.RECORD_FILE,
        }
        engines = {"onnx": _export_onnx(dest)}
        bundle.write_metadata(dest, name=MODEL_NAME, tag=str(m.tag), lineage=summary, engines=engines)
        return str(m.tag)


def _export_onnx(dest: Path) -> dict[str, Any]:
    """``model.onnx`` beside the packaged weights (:func:`pipeline.model.inference.write_onnx`): what
    the service runs without torch. A graph that disagrees with the weights is not packaged."""
    from pipeline.model.inference import write_onnx

    try:
        return write_onnx(dest, bundle.ONNX_FILE)
    except bundle.ModelLoadError as exc:
        raise RegistryError(str(exc)) from None
