"""Label-review decisions: a person's verdict on a suspected label error, versioned in git.

``labels/decisions.csv`` (:attr:`pipeline.core.layout.Layout.label_decisions`) holds one row per
decision, appended by ``lesionflow label decide``: the image, ``corrected`` (with the new
diagnosis) or ``kept``, the diagnosis before, who decided, when, and why. The file is a DVC
dependency of the ``split`` stage, which applies it (:func:`apply`) before splitting, so training,
evaluation and every later stage see the corrected labels, and a correction is itself a commit an
auditor can read. The ``review`` stage reads it too: a kept or corrected image is marked
``reviewed`` in its list instead of being suspected again.

A diagnosis belongs to a lesion (HAM10000 labels lesions, and ingest keeps a lesion's diagnosis
one), so a correction applies to every image of the image's lesion. When an image has several
decisions, the last row counts. The data table itself is never changed: the data version stays
what DVC recorded, and the decisions are the layer above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import fsutil
from pipeline.core.errors import LesionflowError

#: The file's columns, in order.
COLUMNS = ("image_id", "decision", "dx", "dx_before", "reviewer", "decided_at", "note")
CORRECTED, KEPT = "corrected", "kept"


class DecisionError(LesionflowError, ValueError):
    """A bad decisions file or decision; the message names the file, row and field."""


def empty() -> pd.DataFrame:
    """A decisions table without rows."""
    return pd.DataFrame({c: pd.Series(dtype=str) for c in COLUMNS})


def read(path: Path | str, diagnoses: Sequence[str]) -> pd.DataFrame:
    """Every decision of ``path`` (an empty table when the file does not exist), checked: the
    columns, ``decision`` one of corrected/kept, a corrected row's ``dx`` one of ``diagnoses``.
    Rows are numbered as in a spreadsheet (the header is row 1)."""
    from pipeline.core.metadata import read_csv

    path = Path(path)
    if not path.exists():
        return empty()
    table = read_csv(path, "label decisions", dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise DecisionError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(COLUMNS)})")
    for i, row in table.iterrows():
        where = f"{path}: row {int(i) + 2}"
        if not row["image_id"].strip():
            raise DecisionError(f"{where}: image_id is empty")
        if row["decision"] not in (CORRECTED, KEPT):
            raise DecisionError(f"{where}: decision {row['decision']!r}: expected {CORRECTED} or {KEPT}")
        if row["decision"] == CORRECTED and row["dx"] not in diagnoses:
            raise DecisionError(f"{where}: dx {row['dx']!r}: expected one of {', '.join(diagnoses)}")
    return table[list(COLUMNS)]


def latest(decisions: pd.DataFrame) -> pd.DataFrame:
    """The last decision of each image."""
    return decisions.drop_duplicates("image_id", keep="last").reset_index(drop=True)


def apply(meta: pd.DataFrame, decisions: pd.DataFrame, source: str = "decisions") -> tuple[pd.DataFrame, dict]:
    """``meta`` with every correction applied to the whole lesion of its image, and a summary
    (corrections, images relabelled, decisions about images not in the data). Two corrections that
    give one lesion different diagnoses are refused, naming both images."""
    out = meta.copy()
    last = latest(decisions)
    corrected = last[last["decision"] == CORRECTED]
    known = set(out["image_id"].astype(str))
    absent = sorted(set(last["image_id"]) - known)
    lesion_of = dict(zip(out["image_id"].astype(str), out["lesion_id"].astype(str)))
    by_lesion: dict[str, tuple[str, str]] = {}
    for image_id, dx in zip(corrected["image_id"], corrected["dx"]):
        lesion = lesion_of.get(image_id)
        if lesion is None:
            continue
        earlier = by_lesion.setdefault(lesion, (image_id, dx))
        if earlier[1] != dx:
            raise DecisionError(
                f"{source}: images {earlier[0]} and {image_id} of lesion {lesion} are corrected to different "
                f"diagnoses ({earlier[1]} and {dx}); a lesion has one diagnosis"
            )
    changed = out["lesion_id"].astype(str).map(lambda les: les in by_lesion)
    before = out.loc[changed, "dx"].copy()
    out.loc[changed, "dx"] = out.loc[changed, "lesion_id"].astype(str).map(lambda les: by_lesion[les][1])
    summary = {
        "decisions": int(len(last)),
        "corrected": int(len(corrected)),
        "kept": int((last["decision"] == KEPT).sum()),
        "images_relabelled": int((before != out.loc[changed, "dx"]).sum()),
        "not_in_data": absent,
    }
    return out, summary


def record(
    path: Path | str,
    image_id: str,
    decision: str,
    dx_before: str,
    dx: str | None = None,
    reviewer: str = "",
    note: str = "",
    when: datetime | None = None,
) -> dict[str, Any]:
    """Append one decision to ``path`` (created with its header when missing; rewritten atomically)
    and return it as a row."""
    if decision not in (CORRECTED, KEPT):
        raise DecisionError(f"decision {decision!r}: expected {CORRECTED} or {KEPT}")
    if decision == CORRECTED and (not dx or dx == dx_before):
        raise DecisionError(f"{image_id}: a correction needs a new diagnosis other than {dx_before!r}")
    row = {
        "image_id": image_id,
        "decision": decision,
        "dx": dx if decision == CORRECTED else dx_before,
        "dx_before": dx_before,
        "reviewer": reviewer,
        "decided_at": (when or datetime.now(UTC)).isoformat(timespec="seconds"),
        "note": note,
    }
    path = Path(path)
    table = pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else empty()
    table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)[list(COLUMNS)]
    fsutil.atomic_write_text(path, table.to_csv(index=False))
    return row
