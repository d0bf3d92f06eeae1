"""Label Studio interchange: the labelling interface, tasks out, annotations back.

* :func:`label_config`: the project's labelling interface (XML): the image, the diagnosis (one of
  the taxonomy's, required), how it was confirmed (one of ``metadata.dx_types``, required), an
  optional lesion id (images of one lesion share it) and a free-text note;
* :func:`task`: one task of the queue (``data``: the image, its id, the queue's reason and the
  similar training cases as context; ``predictions``: the model's diagnosis as a pre-annotation,
  which the annotator confirms or changes);
* :func:`read_export`: a Label Studio JSON export (a list of tasks with their annotations), or a
  CSV of ``image_id, dx, dx_type[, lesion_id, age, sex, localization]``, as rows of the data's
  table. The last annotation of a task that was not cancelled counts; a task without one is
  reported as unlabelled, not guessed.

Standard library and pandas only; the HTTP side is Label Studio's own SDK (docs/labels.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pandas as pd

from pipeline.core.errors import LesionflowError

#: The control names of the labelling interface (the ``from_name`` of an annotation's results).
IMAGE, DX, DX_TYPE, LESION, NOTE = "image", "dx", "dx_type", "lesion_id", "note"
#: The columns of a labelled row.
COLUMNS = ("image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization")


class ExportError(LesionflowError, ValueError):
    """An export that cannot be read; the message names the file and the task or row."""


def label_config(diagnoses: Sequence[str], dx_types: Sequence[str], names: Mapping[str, str] | None = None) -> str:
    """The labelling interface: an image, a required diagnosis and confirmation, optional lesion id
    and note. ``names``: a display name per diagnosis code."""
    names = names or {}
    dx = "".join(f"<Choice value={quoteattr(c)} hint={quoteattr(names.get(c, c))}/>" for c in diagnoses)
    how = "".join(f"<Choice value={quoteattr(t)}/>" for t in dx_types)
    return (
        "<View>"
        f'<Image name="{IMAGE}" value="${IMAGE}" zoom="true"/>'
        f'<Header value="Diagnosis"/>'
        f'<Choices name="{DX}" toName="{IMAGE}" choice="single" required="true">{dx}</Choices>'
        f'<Header value="Confirmed by"/>'
        f'<Choices name="{DX_TYPE}" toName="{IMAGE}" choice="single" required="true">{how}</Choices>'
        f'<Header value="Lesion id (the same for images of one lesion; empty: a new lesion)"/>'
        f'<TextArea name="{LESION}" toName="{IMAGE}" maxSubmissions="1" editable="true"/>'
        f'<TextArea name="{NOTE}" toName="{IMAGE}" placeholder="Note (optional)"/>'
        f'<Header value="$context"/>'
        "</View>"
    )


def task(
    image_url: str,
    image_id: str,
    reason: str,
    predicted_dx: str | None,
    confidence: float | None,
    model_version: str,
    context: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One Label Studio task (see the module docstring); ``extra`` goes into ``data`` as is."""
    data = {IMAGE: image_url, "image_id": image_id, "reason": reason, "context": escape(context), **(extra or {})}
    out: dict[str, Any] = {"data": data}
    if predicted_dx is not None:
        result = {"from_name": DX, "to_name": IMAGE, "type": "choices", "value": {"choices": [predicted_dx]}}
        out["predictions"] = [{"model_version": model_version, "score": confidence, "result": [result]}]
    return out


def _answer(results: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    got: dict[str, str] = {}
    for r in results:
        value = r.get("value") or {}
        if "choices" in value and value["choices"]:
            got[str(r.get("from_name"))] = str(value["choices"][0])
        elif "text" in value and value["text"]:
            got[str(r.get("from_name"))] = str(value["text"][0]).strip()
    return got


def _from_json(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not a Label Studio JSON export ({exc})") from None
    if not isinstance(tasks, list):
        raise ExportError(f"{path}: expected a list of tasks (Label Studio's JSON export)")
    rows, unlabelled = [], []
    for n, t in enumerate(tasks, 1):
        data = t.get("data") or {}
        image_id = str(data.get("image_id") or "").strip()
        if not image_id:
            raise ExportError(f"{path}: task {n} (id {t.get('id')}): no data.image_id (not a lesionflow task)")
        done = [a for a in t.get("annotations") or [] if not a.get("was_cancelled")]
        answer = _answer(done[-1].get("result") or []) if done else {}
        if DX not in answer:
            unlabelled.append(image_id)
            continue
        rows.append({"image_id": image_id, "lesion_id": answer.get(LESION, ""), "dx": answer[DX],
                     "dx_type": answer.get(DX_TYPE, ""), "age": data.get("age"), "sex": data.get("sex"),
                     "localization": data.get("localization"), "note": answer.get(NOTE, ""),
                     "sha256": data.get("sha256", "")})  # fmt: skip
    return rows, unlabelled


def _from_csv(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    from pipeline.core.metadata import read_csv

    table = read_csv(path, "labels", dtype=str, keep_default_na=False)
    missing = [c for c in ("image_id", "dx", "dx_type") if c not in table.columns]
    if missing:
        raise ExportError(f"{path}: missing column(s) {', '.join(missing)} (image_id, dx, dx_type[, lesion_id])")
    rows, unlabelled = [], []
    for r in table.to_dict("records"):
        if not str(r["dx"]).strip():
            unlabelled.append(str(r["image_id"]))
            continue
        rows.append({c: r.get(c) for c in COLUMNS} | {"note": r.get("note", ""), "sha256": r.get("sha256", "")})
    return rows, unlabelled


def read_export(path: Path | str) -> tuple[pd.DataFrame, list[str]]:
    """The labelled rows of a JSON export or CSV (``COLUMNS`` plus ``note`` and ``sha256``, the
    queued image's digest when the task carried it; an empty lesion id means a new lesion) and
    the image ids left unlabelled."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: export not found")
    rows, unlabelled = _from_csv(path) if path.suffix.lower() == ".csv" else _from_json(path)
    frame = pd.DataFrame(rows, columns=[*COLUMNS, "note", "sha256"])
    dupes = frame["image_id"][frame["image_id"].duplicated()].tolist()
    if dupes:
        raise ExportError(f"{path}: image(s) labelled twice: {', '.join(dupes[:5])}")
    return frame, unlabelled
