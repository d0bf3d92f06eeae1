"""The model registry: the one owner of the BentoML model store and Bento builds.

Only a model that passed every evaluation gate is ever saved, so the newest model in the store
is the **champion**. Each saved model carries what an auditor needs to trace it back: the data
version (md5 of ``data.dvc``), the git commit, the DVC stage hashes of ``dvc.lock``, the
parameters, the test metrics, the gate verdict and the binary operating threshold.

    tag = package(Path("artifacts/model"), Path("artifacts/evaluate"), Path("reports/evaluate"))
    champion()                              # {"tag", "path", "labels", "metadata", "created_at"} or None
    export_champion(Path("artifacts/champion"))   # model.pt + config.json + operating_point.json
    describe("lesionflow-classifier:abc123")      # or a Bento tag: lineage + restore commands
    build_bento()                           # `bentoml build` of bentofile.yaml, offline

The store lives under ``$BENTOML_HOME`` (the Makefile sets ``.lesionflow/bentoml``; tests a
temporary directory); it is read from the environment at every call, so a process can switch
homes. A saved model directory holds ``model.pt``, ``config.json`` (what
:func:`pipeline.inference.load_model` reads), ``operating_point.json``, ``gates.json``,
``metrics.json`` and ``lesionflow.json`` (the full lineage record, readable without BentoML).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pipeline import lineage
from pipeline.fsutil import staged_dir, write_json

MODEL_NAME = "lesionflow-classifier"
BENTO_NAME = "lesionflow"

MODEL_FILE = "model.pt"  # same names as pipeline.inference (not imported: it pulls in torch)
CONFIG_FILE = "config.json"
OPERATING_POINT_FILE = "operating_point.json"
GATES_FILE = "gates.json"
METRICS_FILE = "metrics.json"
RECORD_FILE = "lesionflow.json"
#: What a champion export (and the service) needs.
SERVING_FILES = (MODEL_FILE, CONFIG_FILE, OPERATING_POINT_FILE)
BUILD_TIMEOUT_S = 900


class RegistryError(RuntimeError):
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
    if not path.exists():
        raise RegistryError(f"{path}: {what} not found (run the train and evaluate stages first: dvc repro evaluate)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{path}: {what} must be a JSON object")
    return doc


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
            **{kind: {d.get("path"): d.get("md5") for d in entry.get(kind) or [] if isinstance(d, dict)}
               for kind in ("deps", "outs")},
        }
    return out


#: Tracked files a pipeline run rewrites itself: their changes do not make the code differ from the
#: commit (dvc.lock's stage hashes are recorded in the package under ``dvc_lock``).
RUN_RECORDS = ("dvc.lock",)


def git_state(project_root: Path) -> dict[str, Any]:
    """The commit the package's code comes from: ``commit``, ``dirty`` (tracked files other than
    :data:`RUN_RECORDS` differ from it) and ``modified`` (those files), plus ``run_records_modified``
    (e.g. dvc.lock rewritten by the run that trained the model and not yet committed)."""
    git = dict(lineage.git_commit(project_root))
    if git.get("dirty") is None:
        return git
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_root,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return git
    changed = sorted({line[3:].strip().split(" -> ")[-1] for line in out.splitlines() if line.strip()})
    git["modified"] = [f for f in changed if f not in RUN_RECORDS]
    git["run_records_modified"] = [f for f in changed if f in RUN_RECORDS]
    git["dirty"] = bool(git["modified"])
    return git


def _read_params(project_root: Path) -> dict[str, Any]:
    from pipeline import params

    path = project_root / "params.yaml"
    if not path.exists():
        return {}
    return params.read_yaml(path)


def package(model_dir: Path, evaluate_dir: Path, reports_dir: Path, *, project_root: Path = Path(".")) -> str:
    """Save the evaluated model of ``model_dir`` into the BentoML model store; return its tag.

    Reads ``model_dir/{model.pt,config.json}``, ``evaluate_dir/operating_point.json`` and
    ``reports_dir/{gates.json,metrics.json}``. Refuses (:class:`RegistryError`) a model whose gate
    verdict did not pass, or whose evaluation was of another model (md5 mismatch), so the store
    only ever holds gated models and the newest one is the champion.
    """
    model_dir, evaluate_dir, reports_dir, root = map(Path, (model_dir, evaluate_dir, reports_dir, project_root))
    weights = model_dir / MODEL_FILE
    if not weights.exists():
        raise RegistryError(f"{weights}: model weights not found (run the train stage first: dvc repro train)")
    config = _read_json(model_dir / CONFIG_FILE, "model config")
    op = _read_json(evaluate_dir / OPERATING_POINT_FILE, "operating point")
    verdict = _read_json(reports_dir / GATES_FILE, "gate verdict")
    test_metrics = _read_json(reports_dir / METRICS_FILE, "test metrics")

    if verdict.get("passed") is not True:
        failed = ", ".join(verdict.get("failed") or []) or "verdict not passed"
        raise RegistryError(
            f"{reports_dir / GATES_FILE}: the model failed its gates ({failed}); it is not packaged "
            "and the champion stays as it is"
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

    data = lineage.data_version(root / "data.dvc")
    git = git_state(root)
    arch = config.get("architecture") or {}
    record = _plain({
        "model_md5": model_md5,
        "data": data,
        "git": git,
        "dvc_lock": dvc_lock_hashes(root / "dvc.lock"),
        "params": _read_params(root),
        "metrics": test_metrics,
        "gates": verdict,
        "operating_point": op,
        "threshold": threshold,
        "model": {
            "backbone": arch.get("backbone"),
            "input_size": arch.get("input_size"),
            "target_level": config.get("target_level"),
            "classes": config.get("classes"),
            "format": config.get("format"),
            "train_lineage": config.get("lineage"),
        },
        "sources": {"model_dir": str(model_dir), "evaluate_dir": str(evaluate_dir), "reports_dir": str(reports_dir)},
        "packaged_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "libraries": lineage.library_versions(),
    })
    labels = {
        "data_md5": str(data.get("md5")),
        "git_commit": str(git.get("commit")),
        "git_dirty": str(git.get("dirty")).lower(),
        "model_md5": model_md5,
        "gates": "passed",
        "threshold": f"{threshold:.6g}",
        "backbone": str(arch.get("backbone")),
        "target_level": str(config.get("target_level")),
    }
    import bentoml

    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=_bentoml_metadata(record), _model_store=_model_store()) as m:
        dest = Path(m.path)
        shutil.copy2(weights, dest / MODEL_FILE)
        shutil.copy2(model_dir / CONFIG_FILE, dest / CONFIG_FILE)
        shutil.copy2(evaluate_dir / OPERATING_POINT_FILE, dest / OPERATING_POINT_FILE)
        shutil.copy2(reports_dir / GATES_FILE, dest / GATES_FILE)
        shutil.copy2(reports_dir / METRICS_FILE, dest / METRICS_FILE)
        # the drift-monitoring reference profile of this very model (stage `reference`), if built
        ref_dir = root / "artifacts" / "reference"
        if (ref_dir / "profile.json").exists() and \
                json.loads((ref_dir / "profile.json").read_text()).get("model", {}).get("model_md5") == model_md5:
            shutil.copytree(ref_dir, dest / "reference")
        write_json(dest / RECORD_FILE, {"tag": str(m.tag), **record})
        if lineage.file_md5(dest / MODEL_FILE) != model_md5:  # changed while copying
            raise RegistryError(f"{weights}: changed while being packaged; try again")
        tag = str(m.tag)
    return tag


# ----------------------------------------------------------------------------------------------
# champion


def champion() -> dict[str, Any] | None:
    """The champion (the newest stored model): ``{"tag", "path", "labels", "metadata",
    "created_at"}``, or None when the store holds no lesionflow model."""
    models = _models()
    return _model_record(models[-1]) if models else None


def export_champion(dest: Path) -> str | None:
    """Copy the champion's ``model.pt``, ``config.json`` and ``operating_point.json`` (plus
    ``champion.json``: tag, md5s, threshold) to ``dest``, replacing it atomically; return the tag.
    Without a champion, remove ``dest`` and return None."""
    dest = Path(dest)
    champ = champion()
    if champ is None:
        if dest.exists():
            shutil.rmtree(dest)
        return None
    src = Path(champ["path"])
    with staged_dir(dest) as stage:
        for name in SERVING_FILES:
            if not (src / name).exists():
                raise RegistryError(f"{src / name}: missing from the champion {champ['tag']} (store corrupted?)")
            shutil.copy2(src / name, stage / name)
        if (src / "reference").is_dir():
            shutil.copytree(src / "reference", stage / "reference")
        write_json(stage / "champion.json", {
            "tag": champ["tag"],
            "model_md5": champ["labels"].get("model_md5"),
            "data_md5": champ["labels"].get("data_md5"),
            "git_commit": champ["labels"].get("git_commit"),
            "threshold": champ["metadata"].get("threshold"),
            "created_at": champ["created_at"],
        })
    return champ["tag"]


# ----------------------------------------------------------------------------------------------
# tracing


def _known_tags() -> str:
    models = [str(m.tag) for m in _models()][-5:]
    try:
        bentos = [str(b.tag) for b in _bento_store().list(BENTO_NAME)][-5:]
    except Exception:  # NotFound when there is none
        bentos = []
    return (f"known models: {', '.join(models) or 'none'}; known bentos: {', '.join(bentos) or 'none'} "
            f"(store: {bentoml_home()})")


def describe(tag: str) -> dict[str, Any]:
    """Everything an auditor needs about a model tag or a Bento tag (then: the Bento's model).

    Returns the tag(s), the model's path, data md5 and data version, git commit, params, test
    metrics, gate verdict, operating threshold, ``dvc.lock`` stage hashes, model md5 and
    ``restore``: the shell commands that bring back the code and the data of that model.
    Raises :class:`RegistryError` for an unknown or malformed tag.
    """
    from bentoml._internal.tag import Tag
    from bentoml.exceptions import BentoMLException, NotFound

    if not isinstance(tag, str) or not tag.strip():
        raise RegistryError(f"empty tag; {_known_tags()}")
    tag = tag.strip()
    try:
        parsed = Tag.from_taglike(tag)
    except (ValueError, BentoMLException) as exc:
        raise RegistryError(f"{tag!r} is not a valid tag ({exc}); {_known_tags()}") from None
    bento_tag = None
    model = None
    if parsed.name == MODEL_NAME:
        try:
            model = _model_store().get(parsed)
        except (NotFound, BentoMLException):
            model = None
    else:
        try:
            bento = _bento_store().get(parsed)
        except (NotFound, BentoMLException):
            bento = None
        if bento is not None:
            bento_tag = str(bento.tag)
            refs = [m for m in bento.info.all_models if m.tag.name == MODEL_NAME]
            if not refs:
                raise RegistryError(f"bento {bento_tag} holds no {MODEL_NAME} model")
            try:
                model = _model_store().get(refs[0].tag)
            except (NotFound, BentoMLException):
                # an imported bento carries its models inside
                from bentoml._internal.models.model import ModelStore

                model = ModelStore(str(Path(bento.path) / "models")).get(refs[0].tag)
    if model is None:
        raise RegistryError(f"unknown tag {tag!r}: no such model or bento in the BentoML store; {_known_tags()}")

    rec = _model_record(model)
    md = rec["metadata"]
    commit = (md.get("git") or {}).get("commit", "unknown")
    dirty = (md.get("git") or {}).get("dirty")
    data_md5 = (md.get("data") or {}).get("md5", "unknown")
    restore = [
        f"git checkout {commit}",
        "dvc checkout data.dvc    # or, when the data is not in the local DVC cache: dvc pull data.dvc",
        f"# check: the md5 in data.dvc is now {data_md5}",
        "dvc checkout             # every stage output of that commit (dvc pull when not cached)",
    ]
    notes = []
    if dirty:
        modified = (md.get("git") or {}).get("modified") or []
        notes.append("the working tree had uncommitted changes when this model was packaged"
                     + (f" ({', '.join(modified[:5])}{' ...' if len(modified) > 5 else ''})" if modified else "")
                     + ": the commit alone does not reproduce its code exactly")
    if (md.get("git") or {}).get("run_records_modified"):
        notes.append("dvc.lock had been rewritten by the run that produced this model and was not yet committed: "
                     "the stage hashes of that run are in this package (dvc_lock); after `git checkout`, "
                     "`dvc repro` rebuilds any stage output whose hashes differ")
    if commit == "unknown":
        notes.append("no git commit was recorded (packaged outside a git repository)")
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
        "git_dirty": dirty,
        "params": md.get("params"),
        "metrics": md.get("metrics"),
        "gates": md.get("gates"),
        "threshold": md.get("threshold"),
        "operating_point": md.get("operating_point"),
        "dvc_lock": md.get("dvc_lock"),
        "model": md.get("model"),
        "restore": restore,
        "notes": notes,
    }


# ----------------------------------------------------------------------------------------------
# Bento


def build_bento(project_root: Path = Path(".")) -> str:
    """Build a Bento of ``bentofile.yaml`` serving the champion (pinned by tag); return its tag.

    Runs ``bentoml build`` in a subprocess (offline: ``python.lock_packages: false``; the model
    store is ``$BENTOML_HOME``). The built Bento holds its generated Dockerfile under
    ``env/docker/``. Raises :class:`RegistryError` without a champion or when the build fails.
    """
    root = Path(project_root).resolve()
    champ = champion()
    if champ is None:
        raise RegistryError(f"no champion in the BentoML store at {bentoml_home()}: package a model first")
    if not (root / "bentofile.yaml").exists():
        raise RegistryError(f"{root / 'bentofile.yaml'}: not found")
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home()), "BENTOML_DO_NOT_TRACK": "true",
           "LESIONFLOW_MODEL_TAG": champ["tag"]}
    cmd = [sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml", "-o", "tag",
           "--arg", f"model_tag={champ['tag']}",
           "--label", f"model_tag={champ['tag'].replace(':', '.')}",
           "--label", f"data_md5={champ['labels'].get('data_md5', 'unknown')}",
           "--label", f"git_commit={champ['labels'].get('git_commit', 'unknown')}",
           str(root)]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RegistryError(f"bentoml build did not finish within {BUILD_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RegistryError(f"bentoml build failed (exit {proc.returncode}):\n{tail}")
    tags = [ln.split("__tag__:", 1)[1].strip() for ln in proc.stdout.splitlines() if "__tag__:" in ln]
    if not tags:
        raise RegistryError(f"bentoml build printed no tag:\n{proc.stdout[-2000:]}")
    bento_tag = tags[-1]
    bento = _bento_store().get(bento_tag)
    if not (Path(bento.path) / "env" / "docker" / "Dockerfile").exists():
        raise RegistryError(f"bento {bento_tag}: no generated Dockerfile under {bento.path}/env/docker")
    return bento_tag


def bento_dockerfile(tag: str) -> Path:
    """Path of the generated Dockerfile inside a built Bento."""
    from bentoml.exceptions import NotFound

    try:
        bento = _bento_store().get(tag)
    except NotFound:
        raise RegistryError(f"unknown bento {tag!r}; {_known_tags()}") from None
    return Path(bento.path) / "env" / "docker" / "Dockerfile"
