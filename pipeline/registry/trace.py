"""Tracing a model tag (or a Bento tag) back to its code and data, and the records kept with it.

describe("lesionflow-classifier:abc123")   # lineage, metrics, verdict + the commands restoring them
record_external(tag, "site-b", summary)     # an external validation kept with the stored model
record_site(tag, record)                    # a site's operating point kept with it (lesionflow site add)
record_drift_check(summary)                 # a drift check kept with every stored model it ran against
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.fsutil import read_json, write_json
from pipeline.model import sites
from pipeline.model.bundle import EXTERNAL_DIR, MONITORING_DIR
from pipeline.registry.store import model_record, models, resolve


def restore_commands(commit: str, data_md5: str) -> list[str]:
    """The shell commands that bring back a model's code and data."""
    return [
        f"git checkout {commit}",
        "dvc checkout data.dvc    # or, when the data is not in the local DVC cache: dvc pull data.dvc",
        f"# check: the md5 in data.dvc is now {data_md5}",
        "dvc checkout             # every stage output of that commit (dvc pull when not cached)",
    ]


def notes(git: dict[str, Any]) -> list[str]:
    """What an auditor should know about the code state the model was packaged from."""
    found = []
    if git.get("dirty"):
        modified = git.get("modified") or []
        found.append(
            "the working tree had uncommitted changes when this model was packaged"
            + (f" ({', '.join(modified[:5])}{' ...' if len(modified) > 5 else ''})" if modified else "")
            + ": the commit alone does not reproduce its code exactly"
        )
    if git.get("run_records_modified"):
        found.append(
            "dvc.lock had been rewritten by the run that produced this model and was not yet committed: "
            "the stage hashes of that run are in this package (dvc_lock); after `git checkout`, "
            "`dvc repro` rebuilds any stage output whose hashes differ"
        )
    if git.get("commit", "unknown") == "unknown":
        found.append("no git commit was recorded (packaged outside a git repository)")
    return found


def describe(tag: str) -> dict[str, Any]:
    """Everything an auditor needs about a model tag or a Bento tag (then: the Bento's model).

    Returns the tag(s), the model's path, data md5 and data version, git commit, params, test
    metrics and their CIs, gate verdict, operating threshold, ``dvc.lock`` stage hashes, model md5
    and ``restore``: the shell commands that bring back the code and the data of that model.
    Raises :class:`pipeline.registry.store.RegistryError` for an unknown or malformed tag.
    """
    model, bento_tag = resolve(tag)
    rec = model_record(model)
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
        "restore": restore_commands(commit, data_md5),
        "notes": notes(git),
        "external_validations": external_validations(Path(rec["path"])),
        "sites": [s.record for s in sites.load(rec["path"]).values()],
        "drift_checks": drift_checks(Path(rec["path"])),
    }


def record_external(tag: str, name: str, summary: dict[str, Any]) -> Path:
    """Keep an external validation's summary with a stored model (``external/<name>.json`` in its
    folder), so that :func:`describe` and ``lesionflow trace`` show it. Returns the file."""
    model, _ = resolve(tag)
    path = Path(model.path) / EXTERNAL_DIR / f"{name}.json"
    write_json(path, summary)
    return path


def external_validations(model_path: Path) -> list[dict[str, Any]]:
    """The external validations recorded with a stored model, oldest first."""
    found = [read_json(f) for f in sorted((Path(model_path) / EXTERNAL_DIR).glob("*.json"))]
    return sorted((f for f in found if f), key=lambda d: str(d.get("created_at", "")))


def record_site(tag: str, record: dict[str, Any], replace: bool = False) -> Path:
    """Keep a site's operating point with a stored model (:func:`pipeline.model.sites.write`).
    A site already recorded is kept unless ``replace``; then the record it replaces goes along
    inside the new one (``replaces``), so no earlier decision is lost. Returns the file."""
    model, _ = resolve(tag)
    path = sites.path(model.path, record["name"])
    earlier = read_json(path)
    if earlier is not None:
        if not replace:
            raise sites.SiteError(
                f"site {record['name']!r} is already recorded with {model.tag} ({path}): "
                "pass --replace to record the new measurement (the earlier one is kept inside it)"
            )
        record = {**record, "replaces": earlier}
    return sites.write(model.path, record)


#: What a drift check's record keeps of its summary (never an image or a patient's record).
DRIFT_CHECK_KEYS = (
    "created_at", "source", "n_current", "coverage", "decision", "drift", "drift_share", "reason", "refused",
)  # fmt: skip


def drift_check_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The record of one drift check (:func:`pipeline.monitoring.drift.run_check`'s summary): when,
    on what, coverage, verdict, the model it ran against and its report folder's name."""
    model = (summary.get("reference") or {}).get("model") or {}
    return {
        "report": Path(str(summary.get("report_dir", ""))).name,
        "model_md5": model.get("model_md5"),
        **{k: summary.get(k) for k in DRIFT_CHECK_KEYS},
    }


def record_drift_check(summary: dict[str, Any]) -> list[Path]:
    """Keep a drift check with every stored model it ran against (those whose weights' md5 is the
    reference profile's model's): ``monitoring/<report>.json`` in their folders, so the model's
    monitoring history travels with it (``lesionflow trace``, the audit bundle). Returns the files
    written; none when no stored model has those weights (a workspace model never packaged)."""
    rec = drift_check_record(summary)
    if not rec["model_md5"] or not rec["report"]:
        return []
    written = []
    for model in models():
        if dict(model.info.labels).get("model_md5") == rec["model_md5"]:
            path = Path(model.path) / MONITORING_DIR / f"{rec['report']}.json"
            write_json(path, rec)
            written.append(path)
    return written


def drift_checks(model_path: Path) -> list[dict[str, Any]]:
    """The drift checks recorded with a stored model, oldest first."""
    found = [read_json(f) for f in sorted((Path(model_path) / MONITORING_DIR).glob("*.json"))]
    return sorted((f for f in found if f), key=lambda d: str(d.get("created_at", "")))
