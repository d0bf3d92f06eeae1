"""``lesionflow label queue``: unlabelled images in, a ranked labelling queue out.

Candidates come from a folder of images or from the inference log's stored images (the service
keeps them only with ``LESIONFLOW_LOG_IMAGES=1``), with the answers clinicians disputed
(:func:`pipeline.monitoring.logrecord.dispute_record`). The model predicts each one once
(calibrated probabilities, embedding, the image-quality checks and the out-of-distribution
verdict), :func:`pipeline.evaluation.labelqueue.rank` orders them against the model's retrieval
index (the images it was trained on), and :func:`write` leaves a folder a labelling team works
from: ``images/`` (the files as they came, named by image id), ``queue.csv`` (rank, reason,
uncertainty, novelty, the model's answer, the dispute, the similar training cases),
``tasks.json`` (Label Studio tasks with the model's diagnosis as a pre-annotation and the similar
cases as context), ``label_config.xml`` (the labelling interface) and ``queue.json`` (counts and
lineage: model, params, sources).
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import fsutil, images
from pipeline.data import labelstudio
from pipeline.evaluation import labelqueue


@dataclass
class Candidate:
    """One unlabelled image: its id (the file stem, or the request id of a logged answer), the
    file's bytes and suffix, the metadata known of it and a clinician's disputed diagnosis."""

    image_id: str
    data: bytes
    suffix: str
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    disputed_dx: str | None = None


def from_folder(paths: Sequence[Path]) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """The images under ``paths`` (files or folders, as ``lesionflow predict`` takes them) and
    those skipped, with the reason."""
    files, problems = images.list_images(list(paths))
    return [Candidate(f.stem, f.read_bytes(), f.suffix.lower(), str(f)) for f in files], problems


def from_log(rows: pd.DataFrame) -> tuple[list[Candidate], dict[str, int]]:
    """The answers of an inference-log window (:func:`pipeline.monitoring.inferencelog.read`) that
    kept their image, with their metadata and dispute; and what could not be queued."""
    out: list[Candidate] = []
    counts = {"answers": int(len(rows)), "without_image": 0, "disputed_without_image": 0}
    disputed = rows["disputed_dx"] if "disputed_dx" in rows else pd.Series([None] * len(rows))
    for (_, r), dx in zip(rows.iterrows(), disputed):
        dx = None if not isinstance(dx, str) or not dx else dx
        b64 = r.get("image_b64")
        if not isinstance(b64, str) or not b64:
            counts["without_image"] += 1
            counts["disputed_without_image"] += dx is not None
            continue
        data = base64.b64decode(b64)
        suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
        meta = {k: r.get(k) for k in ("age", "sex", "localization") if k in r and pd.notna(r.get(k))}
        out.append(Candidate(str(r["request_id"]), data, suffix, f"log:{r['request_id']}", meta, dx))
    return out, counts


def _predict(predictor: Any, cands: list[Candidate], batch_size: int) -> tuple[list[Candidate], dict, list]:
    """Predictions of the readable candidates (concatenated over batches) and the unreadable ones."""
    kept, parts, problems = [], [], []
    for s in range(0, len(cands), batch_size):
        rgbs, chunk = [], []
        for c in cands[s : s + batch_size]:
            try:
                rgb = images.decode_rgb(c.data, c.source)
                images.check_size(rgb, predictor.size_limits, c.source)
            except images.ImageError as exc:
                problems.append((c.source, exc.reason))
                continue
            rgbs.append(rgb)
            chunk.append(c)
        if rgbs:
            meta = pd.DataFrame([c.metadata for c in chunk], columns=["age", "sex", "localization"])
            parts.append(predictor.predict(rgbs, metadata=meta, tta=False, batch_size=batch_size))
            kept += chunk
    keys = ("dx_probs", "p_malignant", "embeddings", "in_distribution", "quality_reasons")
    joined = {k: _concat([p[k] for p in parts]) for k in keys}
    return kept, joined, problems


def _concat(values: list[Any]) -> Any:
    if not values or values[0] is None:
        return None
    if isinstance(values[0], np.ndarray):
        return np.concatenate(values)
    return [v for part in values for v in part]


def refused_mask(pred: dict[str, Any], n: int) -> tuple[np.ndarray, list[str]]:
    """Which images the model refused, and why (``ood``, or the quality checks' reasons)."""
    ood = ~np.asarray(pred["in_distribution"], dtype=bool) if pred["in_distribution"] is not None else np.zeros(n, bool)
    quality = pred["quality_reasons"] or [[] for _ in range(n)]
    why = [", ".join([*q, *(["ood"] if o else [])]) for q, o in zip(quality, ood)]
    return np.array([bool(w) for w in why]), why


def build(
    predictor: Any, index: Any, cands: list[Candidate], budget: int, p: Any, threshold: float
) -> tuple[pd.DataFrame, list, list]:
    """The queue (one row per chosen image, best first), its candidates and the unreadable files.
    ``index``: the model's retrieval index; ``p``: the ``label_queue`` params; ``threshold``: the
    model's operating threshold (for the ``risk`` uncertainty)."""
    kept, pred, problems = _predict(predictor, cands, p.batch_size)
    if not kept:
        return pd.DataFrame(), [], problems
    n = len(kept)
    refused, why = refused_mask(pred, n)
    disputed = np.array([c.disputed_dx is not None for c in kept])
    q = labelqueue.rank(pred["dx_probs"], pred["embeddings"], index.vectors, budget, refused=refused,
                        disputed=disputed, kind=p.uncertainty, novelty_weight=p.novelty_weight,
                        p_malignant=pred["p_malignant"], threshold=threshold, random_share=p.random_share,
                        seed=p.seed)  # fmt: skip
    rows = q["row"].to_numpy(dtype=int)
    classes = list(predictor.taxonomy.classes("dx"))
    similar = index.query(pred["embeddings"][rows], p.similar) if len(rows) else []
    probs = pred["dx_probs"][rows]
    q.insert(1, "image_id", [kept[i].image_id for i in rows])
    q["predicted_dx"] = [classes[j] for j in probs.argmax(1)]
    q["p_predicted"] = probs.max(1).round(4)
    q["p_malignant"] = np.round(pred["p_malignant"][rows], 4)
    q["refused_because"] = [why[i] for i in rows]
    q["disputed_dx"] = [kept[i].disputed_dx or "" for i in rows]
    q["similar_cases"] = ["; ".join(f"{c.image_id} {c.dx} {c.dx_type} {c.similarity:.2f}" for c in cases)
                          for cases in similar]  # fmt: skip
    q["source"] = [kept[i].source for i in rows]
    q[["uncertainty", "novelty", "distance"]] = q[["uncertainty", "novelty", "distance"]].round(4)
    return q.drop(columns="row"), [kept[i] for i in rows], problems


def image_url(c: Candidate, template: str | None) -> str:
    """Where Label Studio finds a queued image: ``template`` with ``{name}`` (the file name in
    ``images/``), or the image itself as a data URI."""
    name = c.image_id + c.suffix
    if template:
        return template.replace("{name}", name)
    mime = mimetypes.types_map.get(c.suffix, "image/jpeg")
    return f"data:{mime};base64," + base64.b64encode(c.data).decode("ascii")


def tasks(q: pd.DataFrame, chosen: Iterable[Candidate], model_label: str, template: str | None) -> list[dict]:
    """The Label Studio tasks of a queue, in its order."""
    out = []
    for r, c in zip(q.itertuples(index=False), chosen):
        context = f"#{r.rank} {r.reason}" + (f" ({r.refused_because})" if r.refused_because else "")
        context += f"; clinician said {r.disputed_dx}" if r.disputed_dx else ""
        context += f"; similar training cases: {r.similar_cases}" if r.similar_cases else ""
        extra = {"rank": int(r.rank), "sha256": hashlib.sha256(c.data).hexdigest(),
                 **{k: v for k, v in c.metadata.items() if v is not None}}  # fmt: skip
        out.append(labelstudio.task(image_url(c, template), r.image_id, r.reason, r.predicted_dx,
                                    float(r.p_predicted), model_label, context, extra))  # fmt: skip
    return out


def write(
    dest: Path, q: pd.DataFrame, chosen: list[Candidate], task_list: list[dict], config: str, summary: dict
) -> None:
    """The queue's folder (see the module docstring); ``dest`` must not exist yet."""
    if dest.exists():
        raise FileExistsError(f"{dest}: already exists (nothing is overwritten)")
    (dest / "images").mkdir(parents=True)
    for c in chosen:
        (dest / "images" / (c.image_id + c.suffix)).write_bytes(c.data)
    fsutil.atomic_write_text(dest / "queue.csv", q.to_csv(index=False))
    fsutil.write_json(dest / "tasks.json", task_list)
    fsutil.atomic_write_text(dest / "label_config.xml", config + "\n")
    fsutil.write_json(dest / "queue.json", summary, sort_keys=False)
