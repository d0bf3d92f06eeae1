"""Reproducing a packaged model from what it records: its git commit, its data version, its params.

In a temporary clone of the workspace at the recorded commit, the recorded data version is pulled
from the DVC remote (else from this workspace's DVC cache), the recorded params are put in place,
and ``dvc repro evaluate`` runs every stage. Then:

* **identical**: the weights' md5 equals the recorded one;
* **within intervals**: the weights differ (CPU training is deterministic on one machine type, not
  across them) but every gated test metric lies within its recorded 95 % bootstrap interval;
* **differs**: otherwise.

The report (``reports/audit/reproduce-<version>-<time>/report.json`` and ``.md``) gives both md5s,
both machine descriptions and whether their type matches (:func:`pipeline.core.machine.machine_type`),
and every metric side by side. The clone is removed afterwards unless kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import lineage, project
from pipeline.core.errors import LesionflowError
from pipeline.core.fsutil import atomic_write_text, write_json
from pipeline.core.layout import Layout
from pipeline.core.machine import describe as describe_machine
from pipeline.core.machine import machine_type
from pipeline.model import bundle
from pipeline.registry import trace

WORKSPACE_CACHE = "lesionflow-workspace-cache"


class ReproduceError(LesionflowError):
    """A model whose commit or data version cannot be brought back here."""


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def clone_at(root: Path, commit: str, dest: Path) -> None:
    """``git clone`` the workspace at ``root`` into ``dest`` and check out ``commit``."""
    done = _run(["git", "clone", "--quiet", "--no-checkout", str(root), str(dest)], root)
    if done.returncode != 0:
        raise ReproduceError(f"{root}: cannot clone the workspace ({done.stderr.strip()[-300:]})")
    done = _run(["git", "checkout", "--quiet", commit], dest)
    if done.returncode != 0:
        raise ReproduceError(f"commit {commit}: not in the repository at {root} ({done.stderr.strip()[-300:]})")


def _dvc(clone: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], clone, dict(os.environ, DVC_NO_ANALYTICS="1"))


def pull_data(root: Path, clone: Path, data: dict[str, Any], notes: list[str]) -> str:
    """Put the recorded data version in the clone: ``data.dvc`` pointed at the recorded md5, then
    ``dvc pull`` from the default remote (local remote paths made absolute), else from the
    workspace's own cache. Returns where the data came from."""
    from dvc.repo import Repo

    pointer = clone / Layout(clone).data_pointer.name
    doc = yaml.safe_load(pointer.read_text())
    if doc["outs"][0].get("md5") != data.get("md5"):
        notes.append(f"data.dvc at the commit names {doc['outs'][0].get('md5')}; set to the recorded {data.get('md5')}")
        doc["outs"][0].update({k: data[k] for k in ("md5", "size", "nfiles") if data.get(k) is not None})
        pointer.write_text(yaml.safe_dump(doc, sort_keys=False))
    with Repo(str(root)) as repo:
        remotes = {n: r["url"] for n, r in dict(repo.config["remote"]).items()}
        cache = Path(repo.cache.local.path).parents[1]  # <cache>/files/md5 -> <cache>
    for name, url in remotes.items():
        if "://" not in url:
            _dvc(clone, "remote", "modify", "--local", name, "url", url)
    if remotes and _dvc(clone, "pull", "--quiet", pointer.name).returncode == 0:
        return "the DVC remote"
    _dvc(clone, "remote", "add", "--local", "--force", WORKSPACE_CACHE, str(cache))
    done = _dvc(clone, "pull", "--quiet", "-r", WORKSPACE_CACHE, pointer.name)
    if done.returncode != 0:
        raise ReproduceError(
            f"data version {data.get('md5')}: neither in the DVC remote nor in {cache} ({done.stderr.strip()[-300:]})"
        )
    return f"this workspace's DVC cache ({cache})"


def put_params(clone: Path, params: dict[str, Any], notes: list[str]) -> None:
    """Write the recorded params into the clone when its ``params.yaml`` differs from them."""
    path = Layout(clone).params_file
    if params and (yaml.safe_load(path.read_text()) or {}) != params:
        notes.append("params.yaml at the commit differs from the recorded params: the recorded ones were used")
        path.write_text(yaml.safe_dump(params, sort_keys=False))


def stage_env(clone: Path) -> dict[str, str]:
    """The environment of the clone's run: its own stores, this interpreter's ``python`` first."""
    env = {k: v for k, v in os.environ.items() if k not in project.HOMES}
    project.configure(clone, environ=env)
    env.update(PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", TQDM_MININTERVAL="10")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_pipeline(clone: Path, echo: Callable[[str], None]) -> None:
    """``dvc repro evaluate`` in the clone, its output passed to ``echo`` line by line."""
    cmd = [sys.executable, "-m", "dvc", "repro", "evaluate"]
    with subprocess.Popen(
        cmd, cwd=clone, env=stage_env(clone), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        tail = []
        for line in proc.stdout:
            echo(line.rstrip())
            tail = (tail + [line.rstrip()])[-20:]
    if proc.returncode != 0:
        raise ReproduceError("the pipeline failed in the clone:\n" + "\n".join(tail))


def compare(record: dict[str, Any], metrics: dict[str, Any], new_md5: str) -> dict[str, Any]:
    """Each gated test metric (once, though an absolute and a no-regression gate may both name it):
    recorded value, interval, reproduced value, whether it lies inside."""
    conf = record.get("confidence") or {}
    rows, seen = [], set()
    for g in (record.get("gates") or {}).get("gates") or []:
        if g["metric"] in seen:
            continue
        seen.add(g["metric"])
        level, _, name = str(g["metric"]).partition(".")
        got = (metrics.get(level) or {}).get(name)
        ci = (conf.get(level) or {}).get(name)
        inside = None if ci is None or got is None else bool(ci["low"] - 1e-9 <= got <= ci["high"] + 1e-9)
        rows.append(
            {"metric": g["metric"], "recorded": g.get("value"), "interval_95": ci, "reproduced": got, "inside": inside}
        )
    identical = new_md5 == record.get("model_md5")
    within = all(r["inside"] for r in rows if r["inside"] is not None) and any(r["inside"] is not None for r in rows)
    verdict = "identical" if identical else "within intervals" if within else "differs"
    return {"verdict": verdict, "metrics": rows}


def _recorded_machine(record: dict[str, Any]) -> dict[str, Any] | None:
    """The machine that trained the model, as far as its record tells: the packaging machine when
    the train stage ran on the same host."""
    packaged = record.get("packaged_on")
    train_host = (((record.get("model") or {}).get("train_lineage")) or {}).get("host")
    return packaged if packaged and packaged.get("host") == train_host else None


def reproduce(tag: str, root: Path, keep: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Reproduce model ``tag`` (module docstring); returns the report (``report_dir`` says where)."""
    info = trace.describe(tag)
    record = json.loads((Path(info["path"]) / bundle.RECORD_FILE).read_text())
    commit = (record.get("git") or {}).get("commit", "unknown")
    if commit == "unknown":
        raise ReproduceError(f"{info['tag']}: no git commit recorded; it cannot be reproduced from its lineage")
    notes = list(info.get("notes") or [])
    tmp = Path(tempfile.mkdtemp(prefix="lesionflow-reproduce-"))
    clone = tmp / "workspace"
    try:
        echo(f"cloning {root} at {commit} into {clone}")
        clone_at(root, commit, clone)
        source = pull_data(root, clone, record.get("data") or {}, notes)
        put_params(clone, record.get("params") or {}, notes)
        echo(f"data version {record['data']['md5']} from {source}; running dvc repro evaluate")
        run_pipeline(clone, echo)
        layout = Layout(clone)
        new_md5 = lineage.file_md5(layout.model_dir / bundle.MODEL_FILE)
        metrics = json.loads((layout.reports("evaluate") / "metrics.json").read_text())
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    recorded = _recorded_machine(record)
    here = describe_machine()
    report = {
        "tag": info["tag"],
        "commit": commit,
        "data_md5": record["data"]["md5"],
        "data_from": source,
        "recorded_model_md5": record.get("model_md5"),
        "reproduced_model_md5": new_md5,
        "machines": {"recorded": recorded, "reproduced_on": here},
        "same_machine_type": None if recorded is None else machine_type(recorded) == machine_type(here),
        **compare(record, metrics, new_md5),
        "notes": notes,
        "clone": str(clone) if keep else None,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return report | {"report_dir": str(write_report(root, report))}


def write_report(root: Path, report: dict[str, Any]) -> Path:
    """``report.json`` and ``report.md`` under ``reports/audit/reproduce-<version>-<time>/``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = Layout(root).reports("audit") / f"reproduce-{report['tag'].split(':')[-1]}-{stamp}"
    write_json(folder / "report.json", report)
    atomic_write_text(folder / "report.md", markdown(report))
    return folder


def markdown(r: dict[str, Any]) -> str:
    """The reproduction report as Markdown."""
    said = {
        "identical": "the reproduced weights are identical to the recorded ones",
        "within intervals": "the weights differ, and every gated test metric lies within its recorded 95 % interval",
        "differs": "the weights differ, and not every gated test metric lies within its recorded interval",
    }[r["verdict"]]
    same = {True: "same machine type", False: "another machine type", None: "the training machine is not recorded"}
    lines = [
        f"# Reproduction of {r['tag']}",
        "",
        f"**{r['verdict']}**: {said}.",
        "",
        f"- commit `{r['commit']}`, data version `{r['data_md5']}` (from {r['data_from']})",
        f"- model md5: recorded `{r['recorded_model_md5']}`, reproduced `{r['reproduced_model_md5']}`",
        f"- machines: {same[r['same_machine_type']]}; recorded {json.dumps(r['machines']['recorded'])}; "
        f"reproduced on {json.dumps(r['machines']['reproduced_on'])}",
        "",
        "| metric | recorded | 95 % interval | reproduced | inside |",
        "|---|---|---|---|---|",
    ]
    for m in r["metrics"]:
        ci = m["interval_95"]
        ci_text = "-" if not ci else f"[{ci['low']:.4f}, {ci['high']:.4f}]"
        num = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {m['metric']} | {num(m['recorded'])} | {ci_text} | {num(m['reproduced'])} | {m['inside']} |")
    lines += ["", *(f"- note: {n}" for n in r["notes"])]
    return "\n".join(lines) + "\n"
