"""The evidence an audit of one packaged model asks for, gathered from where each piece lives.

:func:`gather` returns ``{path inside the bundle: bytes}``: the model's own files from the store
(schema, config, lineage record, gates, intervals, operating point, weights, sites, external
validations), its model card and gate report as the evaluate stage wrote them (read from the DVC
cache by the md5s its ``dvc.lock`` recorded), a datasheet of its data version
(:mod:`pipeline.audit.datasheet`), params, ``dvc.lock``, git state, libraries, a CycloneDX SBOM of
this environment and the serving environment's requirements (its Bento), the gate criteria with
their intervals, every drift check run against it, the champion history, the inference log's
schema and counters (never a patient's record), and an index mapping each item to the sections of
EU AI Act Annex IV and of a predetermined change control plan (informational, no legal claim).
:mod:`pipeline.audit.bundle` writes them with a signed manifest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.audit import changeplan, logschema
from pipeline.audit import datasheet as ds
from pipeline.audit.versioned import VersionedFiles, VersionError, stage_output
from pipeline.core.fsutil import read_json
from pipeline.core.layout import Layout
from pipeline.core.machine import describe as describe_machine
from pipeline.model import bundle
from pipeline.registry import history, trace
from pipeline.registry.store import bento_store

#: The model's files copied as they are stored (weights included: the bundle proves what was audited).
MODEL_FILES = (
    bundle.METADATA_FILE,
    bundle.CONFIG_FILE,
    bundle.RECORD_FILE,
    bundle.GATES_FILE,
    bundle.CONFIDENCE_FILE,
    bundle.OPERATING_POINT_FILE,
    bundle.SCORES_FILE,
    bundle.MODEL_FILE,
)
#: The evaluate stage's reports kept with the model's data version (``dvc.lock`` outputs).
CARD_FILES = {"reports/evaluate/model_card.md": "card/model_card.md", "reports/evaluate/gates.md": "card/gates.md"}


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def model_files(path: Path) -> dict[str, bytes]:
    """The stored model's evidence files, its sites and external validations."""
    out = {f"model/{n}": (path / n).read_bytes() for n in MODEL_FILES if (path / n).is_file()}
    for sub in (bundle.SITES_DIR, bundle.EXTERNAL_DIR):
        for f in sorted((path / sub).glob("*.json")):
            out[f"validation/{sub}/{f.name}"] = f.read_bytes()
    return out


def stage_reports(cache: VersionedFiles, record: Mapping[str, Any]) -> tuple[dict[str, bytes], list[str]]:
    """The model card and gate report of the evaluation that passed this model, by md5; notes for
    those the cache no longer has."""
    out, notes = {}, []
    for src, dest in CARD_FILES.items():
        md5 = stage_output(record.get("dvc_lock") or {}, "evaluate", src)
        try:
            if md5 is None:
                raise VersionError(f"{src}: not among the evaluate stage's outputs recorded with the model")
            out[dest] = cache.read(md5, src)
        except VersionError as exc:
            notes.append(str(exc))
    return out, notes


def lineage_files(root: Path, record: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, bytes]:
    """Params, ``dvc.lock`` (recorded hashes, and the file at the commit when git has it), git state."""
    git = record.get("git") or {}
    out = {
        "lineage/params.yaml": yaml.safe_dump(record.get("params") or {}, sort_keys=False).encode(),
        "lineage/dvc_lock.json": _json(record.get("dvc_lock") or {}),
        "lineage/git.json": _json({**git, "restore": info.get("restore"), "notes": info.get("notes")}),
        "lineage/data_version.json": _json(record.get("data") or {}),
    }
    commit = git.get("commit")
    if commit and commit != "unknown":
        found = subprocess.run(["git", "show", f"{commit}:dvc.lock"], cwd=root, capture_output=True)
        if found.returncode == 0:
            out["lineage/dvc.lock"] = found.stdout
    return out


def sbom(root: Path) -> bytes:
    """A CycloneDX SBOM (JSON, with licences) of the Python environment running this export."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sbom.json"
        cmd = [str(Path(sys.executable).parent / "cyclonedx-py"), "environment", sys.executable, "--of", "JSON"]
        pyproject = root / "pyproject.toml"
        cmd += ["--pyproject", str(pyproject)] if pyproject.is_file() else []
        done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"cyclonedx-py failed: {done.stderr.strip()[-500:]}")
        return out.read_bytes()


def serving_environment(tag: str) -> dict[str, bytes]:
    """The requirements of the newest Bento built around the model (what it is served with)."""
    found = []
    for b in bento_store().list():
        doc = yaml.safe_load((Path(b.path) / "bento.yaml").read_text()) or {}
        tags = {m.get("tag") for s in doc.get("services") or [] for m in s.get("models") or []}
        if tag in tags:
            found.append((str(doc.get("creation_time", "")), str(b.tag), Path(b.path)))
    if not found:
        return {}
    _, bento_tag, path = max(found)
    req = path / "env" / "python" / "requirements.txt"
    out = {"environment/serving.json": _json({"bento": bento_tag, "requirements": req.is_file()})}
    if req.is_file():
        out["environment/serving-requirements.txt"] = req.read_bytes()
    return out


def environment_files(root: Path, record: Mapping[str, Any], tag: str, with_sbom: bool) -> dict[str, bytes]:
    """Libraries as recorded at training and packaging, the machines, the SBOM and the serving env."""
    train = ((record.get("model") or {}).get("train_lineage") or {}).get("libraries")
    out = {
        "environment/libraries.json": _json({"training": train, "packaging": record.get("libraries")}),
        "environment/machines.json": _json(
            {"packaged_on": record.get("packaged_on"), "exported_on": describe_machine()}
        ),
    }
    if with_sbom:
        out["environment/sbom.cdx.json"] = sbom(root)
    return out | serving_environment(tag)


def gate_criteria(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each acceptance criterion: metric, kind, direction, threshold, value, interval, verdict, and
    the previous champion's value when there was one."""
    gates = record.get("gates") or {}
    conf = record.get("confidence") or {}
    rows = []
    for g in gates.get("gates") or []:
        level, _, name = str(g.get("metric", "")).partition(".")
        interval = (conf.get(level) or {}).get(name)
        rows.append(
            {
                **{k: g.get(k) for k in ("metric", "gate", "direction", "threshold", "value", "passed", "note")},
                "interval_95": [interval.get("low"), interval.get("high")] if interval else None,
                "champion_value": g.get("champion_value"),
            }
        )
    return rows


def criteria_markdown(rows: list[dict[str, Any]], gates: Mapping[str, Any]) -> str:
    """The acceptance criteria as a table, with the overall verdict."""
    lines = [
        "# Acceptance criteria (decided in params.yaml before the run) and their verdicts",
        "",
        f"Verdict: **{'passed' if gates.get('passed') else 'failed'}**. {gates.get('note') or ''}",
        "",
        "| criterion | kind | threshold | value | 95 % interval | previous champion | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    num = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        op = ">=" if r["direction"] == "min" else "<="
        ci = "-" if not r["interval_95"] else f"[{num(r['interval_95'][0])}, {num(r['interval_95'][1])}]"
        lines.append(
            f"| {r['metric']} | {r['gate']} | {op} {num(r['threshold'])} | {num(r['value'])} | {ci} | "
            f"{num(r['champion_value'])} | {'pass' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


def drift_checks(root: Path, model_path: Path, model_md5: str) -> list[dict[str, Any]]:
    """Every drift check run against this model: those recorded with it in the store, and those in
    the workspace's monitoring reports naming its md5 that were not (checks run before recording)."""
    found = {r.get("report"): r for r in trace.drift_checks(model_path)}
    for f in sorted(Layout(root).monitoring_reports.glob("*/summary.json")):
        s = read_json(f)
        if s is None or f.parent.name in found:
            continue
        if ((s.get("reference") or {}).get("model") or {}).get("model_md5") == model_md5:
            found[f.parent.name] = trace.drift_check_record({**s, "report_dir": str(f.parent)})
    return sorted(found.values(), key=lambda d: str(d.get("created_at", "")))


def gather(
    tag: str,
    root: Path,
    log_counters: Callable[[], Mapping[str, Any]] | None = None,
    with_sbom: bool = True,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Every file of the evidence bundle of model ``tag`` (``{path: bytes}``) and a summary (tag,
    model md5, notes on what could not be included)."""
    info = trace.describe(tag)
    path = Path(info["path"])
    record = json.loads((path / bundle.RECORD_FILE).read_text())
    cache = VersionedFiles(root)
    files = model_files(path)
    reports, notes = stage_reports(cache, record)
    files |= reports
    sheet = ds.datasheet(cache, record)
    files |= {"data/datasheet.json": _json(sheet), "data/datasheet.md": ds.markdown(sheet).encode()}
    files |= lineage_files(root, record, info)
    files |= environment_files(root, record, info["tag"], with_sbom)
    rows = gate_criteria(record)
    files |= {
        "gates/criteria.json": _json(rows),
        "gates/criteria.md": criteria_markdown(rows, record.get("gates") or {}).encode(),
    }
    files["card/sites.md"] = changeplan.sites_markdown(info.get("sites") or [], record.get("threshold")).encode()
    files["lineage/change_control.md"] = changeplan.change_plan_markdown(record.get("params") or {}).encode()
    files["monitoring/drift_checks.json"] = _json(drift_checks(root, path, info["model_md5"]))
    files["history/champions.json"] = _json(history.history())
    files |= logschema.files(log_counters() if log_counters else None)
    summary = {"tag": info["tag"], "model_md5": info["model_md5"], "data_md5": info["data_md5"], "notes": notes}
    return files, summary
