"""The champion's history and rollback (``lesionflow history``, ``lesionflow rollback``), and the
champion's files exported for the retraining flow (:func:`export_champion`).

A rollback makes a previously packaged model the champion again and is recorded, with who, when and
why, in the registry's history file (:func:`pipeline.registry.champions.history_file`); the champion
is always the model of the latest change (:func:`pipeline.registry.champions.timeline`), so a model
packaged after a rollback becomes the champion as usual. Rebuilding the Bento around the restored
champion is :func:`pipeline.registry.bento.build_bento`.
"""

from __future__ import annotations

import getpass
import json
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.fsutil import read_json, staged_dir, write_json
from pipeline.model import bundle
from pipeline.registry.champions import champion, history_file, timeline
from pipeline.registry.store import RegistryError
from pipeline.registry.trace import describe

#: Test metrics shown per champion in the history (those the model's record holds).
KEY_METRICS = (
    "binary.sensitivity_at_operating_point",
    "binary.specificity_at_operating_point",
    "binary.roc_auc",
    "dx.balanced_accuracy",
)


def who() -> str:
    """``user@host`` of this process, as recorded with a rollback."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in a bare container
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _metric(metrics: dict[str, Any], dotted: str) -> Any:
    node: Any = metrics
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def history() -> list[dict[str, Any]]:
    """Champions over time, oldest first: when, which model, how (packaged or rollback, with who
    and why), its data version, git commit and key test metrics, and which one is current."""
    records: dict[str, dict[str, Any]] = {}
    rows = []
    for e in timeline():
        if e["tag"] not in records:
            records[e["tag"]] = describe(e["tag"])
        d = records[e["tag"]]
        rows.append(
            {
                "at": e["at"].isoformat(timespec="seconds"),
                "tag": e["tag"],
                "event": e["event"],
                "data_md5": d.get("data_md5"),
                "git_commit": d.get("git_commit"),
                "metrics": {k: _metric(d.get("metrics") or {}, k) for k in KEY_METRICS},
                "reason": e.get("reason") or ("passed the gates" if e["event"] == "packaged" else None),
                "by": e.get("by"),
                "current": False,
            }
        )
    if rows:
        rows[-1]["current"] = True
    return rows


def previous_champion() -> str | None:
    """The champion before the current one (the default target of a rollback), or None."""
    tags = [e["tag"] for e in timeline()]
    current = tags[-1] if tags else None
    for tag in reversed(tags):
        if tag != current:
            return tag
    return None


def rollback(tag: str | None, reason: str) -> dict[str, Any]:
    """Make the packaged model ``tag`` (a model or Bento tag; default: the previous champion) the
    champion again and record it; returns the recorded event. :class:`RegistryError` when there is
    nothing to roll back to, the tag is unknown or already the champion, or no reason is given."""
    if not reason or not reason.strip():
        raise RegistryError("a rollback needs a reason (--reason TEXT): it is recorded in the history")
    current = champion()
    if tag is None:
        tag = previous_champion()
        if tag is None:
            raise RegistryError("no earlier champion to roll back to (lesionflow history)")
    target = describe(tag)["tag"]  # a Bento tag names its model; unknown tags are refused
    if current is not None and target == current["tag"]:
        raise RegistryError(f"{target} is already the champion (lesionflow history)")
    event = {
        "at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "tag": target,
        "from": current["tag"] if current else None,
        "reason": reason.strip(),
        "by": who(),
    }
    path = history_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event) + "\n")
    return event


def export_champion(dest: Path) -> str | None:
    """Copy the champion's serving files (weights, config, OOD statistics, operating point) and its
    reference profile to ``dest``, plus ``champion.json`` (tag, md5s, threshold), replacing ``dest``
    atomically; return the tag. Without a champion, remove ``dest`` and return None."""
    dest = Path(dest)
    champ = champion()
    if champ is None:
        if dest.exists():
            shutil.rmtree(dest)
        return None
    src = Path(champ["path"])
    with staged_dir(dest) as stage:
        for name in bundle.SERVING_FILES:
            if not (src / name).exists():
                raise RegistryError(f"{src / name}: missing from the champion {champ['tag']} (store corrupted?)")
            shutil.copy2(src / name, stage / name)
        for path in bundle.answer_files(src):  # the OOD statistics, when the model has them
            if path.name not in bundle.SERVING_FILES:
                shutil.copy2(path, stage / path.name)
        if (src / bundle.REFERENCE_DIR).is_dir():
            shutil.copytree(src / bundle.REFERENCE_DIR, stage / bundle.REFERENCE_DIR)
        write_json(
            stage / bundle.CHAMPION_FILE,
            {
                "tag": champ["tag"],
                "model_md5": champ["labels"].get("model_md5"),
                "data_md5": champ["labels"].get("data_md5"),
                "git_commit": champ["labels"].get("git_commit"),
                "threshold": champ["metadata"].get("threshold"),
                "created_at": champ["created_at"],
            },
        )
    return champ["tag"]


def exported_champion_md5(champion_dir: Path) -> str | None:
    """The model md5 of an exported champion (:func:`export_champion`), or None when there is none."""
    info = read_json(Path(champion_dir) / bundle.CHAMPION_FILE) or {}
    return info.get("model_md5") or bundle.model_md5(champion_dir, missing_ok=True)
