"""The model registry: the one owner of the BentoML model store and Bento builds.

Only a model that passed every evaluation gate is ever saved; the newest model in the store is
the **champion** unless a later rollback (:mod:`pipeline.serving.champions`) named an earlier one
(:func:`timeline`). Each saved model carries what an auditor needs to trace it back: the data
version (md5 of ``data.dvc``), the git commit, the DVC stage hashes of ``dvc.lock``, the
parameters, the test metrics, the gate verdict and the binary operating threshold.

    tag = package(Path("artifacts/model"), Path("artifacts/evaluate"), Path("reports/evaluate"))
    champion()                              # {"tag", "path", "labels", "metadata", "created_at"} or None
    describe("lesionflow-classifier:abc123")      # or a Bento tag: lineage + restore commands

The store lives under ``$BENTOML_HOME`` (the Makefile sets ``.lesionflow/bentoml``; tests a
temporary directory); it is read from the environment at every call, so a process can switch
homes. A saved model directory holds ``model.pt``, ``config.json`` (what
:func:`pipeline.model.inference.load_model` reads), ``operating_point.json``, ``gates.json``,
``scores.json`` and ``lesionflow.json`` (the full lineage record, readable without BentoML).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import lineage
from pipeline.core.errors import LesionflowError
from pipeline.core.fsutil import read_json, require_json, write_json
from pipeline.core.layout import Layout
from pipeline.model.checkpoint import CONFIG_FILE, MODEL_FILE
from pipeline.model.ood import OOD_FILE

MODEL_NAME = "lesionflow-classifier"
BENTO_NAME = "lesionflow"

OPERATING_POINT_FILE = "operating_point.json"
GATES_FILE = "gates.json"
METRICS_FILE = "scores.json"  # every headline test number (reports/evaluate/scores.json)
CONFIDENCE_FILE = "confidence.json"
RECORD_FILE = "lesionflow.json"
#: What a champion export (and the service) needs.
SERVING_FILES = (MODEL_FILE, CONFIG_FILE, OPERATING_POINT_FILE)
#: Files a model may carry beside them (the OOD detector's statistics, pipeline.model.ood).
OPTIONAL_MODEL_FILES = (OOD_FILE,)
#: Where external validations of a stored model are recorded (``lesionflow validate-external``).
EXTERNAL_DIR = "external"
#: Where a stored model keeps its retrieval index of training cases (pipeline.model.retrieval).
RETRIEVAL_DIR = "retrieval"


class RegistryError(LesionflowError, RuntimeError):
    """A registry operation that cannot be done; the message says what and why."""


# ----------------------------------------------------------------------------------------------
# stores


def bentoml_home() -> Path:
    """``$BENTOML_HOME`` (BentoML's default ``~/bentoml`` when unset)."""
    return Path(os.path.expanduser(os.environ.get("BENTOML_HOME", os.path.join("~", "bentoml"))))


def _model_store():
    from bentoml._internal.models.model import ModelStore

    path = bentoml_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return ModelStore(str(path))


def _bento_store():
    from bentoml._internal.bento.bento import BentoStore

    path = bentoml_home() / "bentos"
    path.mkdir(parents=True, exist_ok=True)
    return BentoStore(str(path))


def _models() -> list[Any]:
    """Every stored lesionflow model, oldest first."""
    from bentoml.exceptions import NotFound

    try:
        found = _model_store().list(MODEL_NAME)
    except NotFound:
        return []
    return sorted(found, key=lambda m: (m.info.creation_time, str(m.tag.version)))


def _model_record(model: Any) -> dict[str, Any]:
    info = model.info
    record_file = Path(model.path) / RECORD_FILE
    if record_file.exists():  # the full record (BentoML's metadata drops None values)
        metadata = json.loads(record_file.read_text())
        metadata.pop("tag", None)
    else:
        metadata = _plain(dict(info.metadata))
    return {
        "tag": str(model.tag),
        "path": str(model.path),
        "labels": dict(info.labels),
        "metadata": metadata,
        "created_at": info.creation_time.isoformat(timespec="seconds"),
    }


def _plain(obj: Any) -> Any:
    """JSON round trip: plain dicts/lists/str/numbers/None."""
    return json.loads(json.dumps(obj, default=str))


def _bentoml_metadata(obj: Any) -> Any:
    """BentoML metadata refuses None: drop None values from dicts, write "null" in lists (the full
    record, with its None values, is ``lesionflow.json`` beside the model files)."""
    if isinstance(obj, dict):
        return {str(k): _bentoml_metadata(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return ["null" if v is None else _bentoml_metadata(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# packaging


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return require_json(path, what, "run the train and evaluate stages first: dvc repro evaluate")
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


def _read_params(project_root: Path) -> dict[str, Any]:
    from pipeline.core import params

    path = Layout(project_root).params_file
    return params.read_yaml(path) if path.exists() else {}


@dataclass
class Evaluated:
    """A trained model and the evaluation of that very model, checked for packaging."""

    model_dir: Path
    evaluate_dir: Path
    reports_dir: Path
    config: dict[str, Any]
    operating_point: dict[str, Any]
    verdict: dict[str, Any]
    metrics: dict[str, Any]
    confidence: dict[str, Any]
    model_md5: str
    threshold: float


def load_evaluated(model_dir: Path, evaluate_dir: Path, reports_dir: Path) -> Evaluated:
    """Read what packaging needs and refuse (:class:`RegistryError`) a model whose gate verdict did
    not pass, whose evaluation was of another model (md5 mismatch) or whose threshold is unusable."""
    weights = model_dir / MODEL_FILE
    if not weights.exists():
        raise RegistryError(f"{weights}: model weights not found (run the train stage first: dvc repro train)")
    op = _read_json(evaluate_dir / OPERATING_POINT_FILE, "operating point")
    verdict = _read_json(reports_dir / GATES_FILE, "gate verdict")
    if verdict.get("passed") is not True:
        failed = ", ".join(verdict.get("failed") or []) or "verdict not passed"
        raise RegistryError(
            f"{reports_dir / GATES_FILE}: the model failed its gates ({failed}); it is not "
            "packaged and the champion stays as it is"
        )
    model_md5 = lineage.file_md5(weights)
    for source, doc in ((evaluate_dir / OPERATING_POINT_FILE, op), (reports_dir / GATES_FILE, verdict)):
        evaluated = doc.get("model_md5")
        if evaluated is not None and evaluated != model_md5:
            raise RegistryError(
                f"{source}: evaluated model md5 {evaluated} but {weights} has md5 {model_md5}: "
                "re-run the evaluate stage on this model before packaging"
            )
    try:
        threshold = float(op["threshold"])
    except (KeyError, TypeError, ValueError):
        raise RegistryError(f"{evaluate_dir / OPERATING_POINT_FILE}: no numeric 'threshold'") from None
    if not 0.0 <= threshold <= 1.0:
        raise RegistryError(f"{evaluate_dir / OPERATING_POINT_FILE}: threshold {threshold} outside [0, 1]")
    return Evaluated(
        model_dir,
        evaluate_dir,
        reports_dir,
        _read_json(model_dir / CONFIG_FILE, "model config"),
        op,
        verdict,
        _read_json(reports_dir / METRICS_FILE, "test metrics"),
        read_json(reports_dir / CONFIDENCE_FILE) or {},
        model_md5,
        threshold,
    )


def lineage_record(ev: Evaluated, root: Path) -> dict[str, Any]:
    """The package's full record (``lesionflow.json``): data version, git state, ``dvc.lock``
    stage hashes, params, test metrics and CIs, verdict, operating point, model, libraries."""
    layout = Layout(root)
    arch = ev.config.get("architecture") or {}
    return _plain(
        {
            "model_md5": ev.model_md5,
            "data": lineage.data_version(layout.data_pointer),
            "git": lineage.git_state(root),
            "dvc_lock": dvc_lock_hashes(layout.dvc_lock),
            "params": _read_params(root),
            "metrics": ev.metrics,
            "confidence": ev.confidence,
            "gates": ev.verdict,
            "operating_point": ev.operating_point,
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


def _copy_files(ev: Evaluated, dest: Path, root: Path) -> None:
    shutil.copy2(ev.model_dir / MODEL_FILE, dest / MODEL_FILE)
    shutil.copy2(ev.model_dir / CONFIG_FILE, dest / CONFIG_FILE)
    shutil.copy2(ev.evaluate_dir / OPERATING_POINT_FILE, dest / OPERATING_POINT_FILE)
    for name in OPTIONAL_MODEL_FILES:
        if (ev.model_dir / name).exists():
            shutil.copy2(ev.model_dir / name, dest / name)
    for name in (GATES_FILE, METRICS_FILE, CONFIDENCE_FILE):
        if (ev.reports_dir / name).exists():
            shutil.copy2(ev.reports_dir / name, dest / name)
    # the drift-monitoring reference profile and the retrieval index of this very model (stages
    # `reference` and `retrieval`), if built
    layout = Layout(root)
    profile = read_json(layout.reference_dir / "profile.json") or {}
    if (profile.get("model") or {}).get("model_md5") == ev.model_md5:
        shutil.copytree(layout.reference_dir, dest / "reference")
    index = read_json(layout.retrieval_dir / "index.json") or {}
    if index.get("model_md5") == ev.model_md5:
        shutil.copytree(layout.retrieval_dir, dest / RETRIEVAL_DIR)


def package(model_dir: Path, evaluate_dir: Path, reports_dir: Path, *, project_root: Path = Path(".")) -> str:
    """Save the evaluated model of ``model_dir`` into the BentoML model store; return its tag.

    Reads ``model_dir/{model.pt,config.json}``, ``evaluate_dir/operating_point.json`` and
    ``reports_dir/{gates.json,scores.json,confidence.json}``. Refuses (:class:`RegistryError`) a
    model whose gate verdict did not pass, or whose evaluation was of another model (md5 mismatch),
    so the store only ever holds gated models and the newest one is the champion.
    """
    root = Path(project_root)
    ev = load_evaluated(Path(model_dir), Path(evaluate_dir), Path(reports_dir))
    record = lineage_record(ev, root)
    import bentoml

    with bentoml.models.create(
        MODEL_NAME, labels=_labels(record), metadata=_bentoml_metadata(record), _model_store=_model_store()
    ) as m:
        dest = Path(m.path)
        _copy_files(ev, dest, root)
        write_json(dest / RECORD_FILE, {"tag": str(m.tag), **record})
        if lineage.file_md5(dest / MODEL_FILE) != ev.model_md5:  # changed while copying
            raise RegistryError(f"{ev.model_dir / MODEL_FILE}: changed while being packaged; try again")
        return str(m.tag)


# ----------------------------------------------------------------------------------------------
# champion


#: The champion's history beside the model store: one JSON line per rollback (who, when, why).
HISTORY_FILE = "lesionflow-champions.jsonl"


def history_file() -> Path:
    """Where rollbacks are recorded (in the BentoML home, next to the models they name)."""
    return bentoml_home() / HISTORY_FILE


def rollbacks() -> list[dict[str, Any]]:
    """The recorded rollbacks, oldest first (``{"at", "tag", "reason", "by", "from"}``)."""
    path = history_file()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def timeline() -> list[dict[str, Any]]:
    """Every change of champion, oldest first: each stored model's packaging (a gated model
    becomes the champion when it is packaged) and each rollback to a stored model."""
    models = {str(m.tag): m for m in _models()}
    events = [
        {"at": m.info.creation_time.astimezone(UTC), "tag": tag, "event": "packaged"} for tag, m in models.items()
    ]
    for r in rollbacks():
        if r.get("tag") in models:
            events.append({**r, "at": datetime.fromisoformat(r["at"]).astimezone(UTC), "event": "rollback"})
    return sorted(events, key=lambda e: e["at"])


def champion() -> dict[str, Any] | None:
    """The champion: ``{"tag", "path", "labels", "metadata", "created_at"}`` of the model of the
    latest change in :func:`timeline` (the newest packaged model unless a rollback came after it),
    or None when the store holds no lesionflow model."""
    events = timeline()
    if not events:
        return None
    return _model_record(_model_store().get(events[-1]["tag"]))


# ----------------------------------------------------------------------------------------------
# tracing


def _known_tags() -> str:
    models = [str(m.tag) for m in _models()][-5:]
    try:
        bentos = [str(b.tag) for b in _bento_store().list(BENTO_NAME)][-5:]
    except Exception:  # NotFound when there is none
        bentos = []
    return (
        f"known models: {', '.join(models) or 'none'}; known bentos: {', '.join(bentos) or 'none'} "
        f"(store: {bentoml_home()})"
    )


def _resolve(tag: str) -> tuple[Any, str | None]:
    """(the stored model, the Bento tag or None) of a model tag or a Bento tag."""
    from bentoml._internal.tag import Tag
    from bentoml.exceptions import BentoMLException, NotFound

    if not isinstance(tag, str) or not tag.strip():
        raise RegistryError(f"empty tag; {_known_tags()}")
    tag = tag.strip()
    try:
        parsed = Tag.from_taglike(tag)
    except (ValueError, BentoMLException) as exc:
        raise RegistryError(f"{tag!r} is not a valid tag ({exc}); {_known_tags()}") from None
    if parsed.name == MODEL_NAME:
        try:
            return _model_store().get(parsed), None
        except (NotFound, BentoMLException):
            raise RegistryError(f"unknown tag {tag!r}: no such model in the BentoML store; {_known_tags()}") from None
    try:
        bento = _bento_store().get(parsed)
    except (NotFound, BentoMLException):
        raise RegistryError(
            f"unknown tag {tag!r}: no such model or bento in the BentoML store; {_known_tags()}"
        ) from None
    refs = [m for m in bento.info.all_models if m.tag.name == MODEL_NAME]
    if not refs:
        raise RegistryError(f"bento {bento.tag} holds no {MODEL_NAME} model")
    try:
        return _model_store().get(refs[0].tag), str(bento.tag)
    except (NotFound, BentoMLException):  # an imported bento carries its models inside
        from bentoml._internal.models.model import ModelStore

        return ModelStore(str(Path(bento.path) / "models")).get(refs[0].tag), str(bento.tag)


def _restore_commands(commit: str, data_md5: str) -> list[str]:
    return [
        f"git checkout {commit}",
        "dvc checkout data.dvc    # or, when the data is not in the local DVC cache: dvc pull data.dvc",
        f"# check: the md5 in data.dvc is now {data_md5}",
        "dvc checkout             # every stage output of that commit (dvc pull when not cached)",
    ]


def _notes(git: dict[str, Any]) -> list[str]:
    """What an auditor should know about the code state the model was packaged from."""
    notes = []
    if git.get("dirty"):
        modified = git.get("modified") or []
        notes.append(
            "the working tree had uncommitted changes when this model was packaged"
            + (f" ({', '.join(modified[:5])}{' ...' if len(modified) > 5 else ''})" if modified else "")
            + ": the commit alone does not reproduce its code exactly"
        )
    if git.get("run_records_modified"):
        notes.append(
            "dvc.lock had been rewritten by the run that produced this model and was not yet committed: "
            "the stage hashes of that run are in this package (dvc_lock); after `git checkout`, "
            "`dvc repro` rebuilds any stage output whose hashes differ"
        )
    if git.get("commit", "unknown") == "unknown":
        notes.append("no git commit was recorded (packaged outside a git repository)")
    return notes


def describe(tag: str) -> dict[str, Any]:
    """Everything an auditor needs about a model tag or a Bento tag (then: the Bento's model).

    Returns the tag(s), the model's path, data md5 and data version, git commit, params, test
    metrics and their CIs, gate verdict, operating threshold, ``dvc.lock`` stage hashes, model md5
    and ``restore``: the shell commands that bring back the code and the data of that model.
    Raises :class:`RegistryError` for an unknown or malformed tag.
    """
    model, bento_tag = _resolve(tag)
    rec = _model_record(model)
    md = rec["metadata"]
    git = md.get("git") or {}
    commit, data_md5 = git.get("commit", "unknown"), (md.get("data") or {}).get("md5", "unknown")
    return {
        "tag": rec["tag"],
        "bento_tag": bento_tag,
        "path": rec["path"],
        "created_at": rec["created_at"],
        "labels": rec["labels"],
        "model_md5": md.get("model_md5"),
        "data_md5": data_md5,
        "data": md.get("data"),
        "git_commit": commit,
        "git_dirty": git.get("dirty"),
        "params": md.get("params"),
        "metrics": md.get("metrics"),
        "confidence": md.get("confidence"),
        "gates": md.get("gates"),
        "threshold": md.get("threshold"),
        "operating_point": md.get("operating_point"),
        "dvc_lock": md.get("dvc_lock"),
        "model": md.get("model"),
        "restore": _restore_commands(commit, data_md5),
        "notes": _notes(git),
        "external_validations": external_validations(Path(rec["path"])),
    }


def record_external(tag: str, name: str, summary: dict[str, Any]) -> Path:
    """Keep an external validation's summary with a stored model (``external/<name>.json`` in its
    directory), so that :func:`describe` and ``lesionflow trace`` show it. Returns the file."""
    model, _ = _resolve(tag)
    path = Path(model.path) / EXTERNAL_DIR / f"{name}.json"
    write_json(path, summary)
    return path


def external_validations(model_path: Path) -> list[dict[str, Any]]:
    """The external validations recorded with a stored model, oldest first."""
    found = [read_json(f) for f in sorted((Path(model_path) / EXTERNAL_DIR).glob("*.json"))]
    return sorted((f for f in found if f), key=lambda d: str(d.get("created_at", "")))
