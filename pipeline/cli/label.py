"""``lesionflow label queue | import | decide | config``: the labelling loop. Which unlabelled images a
dermatologist should label next (:mod:`pipeline.labelling.queue`), their labels back as a new data
version (:mod:`pipeline.data.labelimport`, then ``lesionflow ingest``), and a person's verdict on a
suspected label error (:mod:`pipeline.data.decisions`). docs/labels.md tells the whole loop."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from pipeline.cli.base import app, err, fail, out, resolve_model, root, safe
from pipeline.core.errors import LesionflowError
from pipeline.core.layout import Layout

label_app = typer.Typer(
    help="The labelling loop: what to label next, labels back as a data version, label-review decisions.",
    no_args_is_help=True,
)
app.add_typer(label_app, name="label")


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _candidates(source: str, since_hours: float | None) -> tuple[list[Any], dict[str, Any]]:
    """The queue's candidates from ``log`` or a folder, and what the source held."""
    from pipeline.labelling import queue
    from pipeline.monitoring import inferencelog, logstore

    if source != "log":
        folder = Path(source)
        if not folder.exists():
            raise fail(f"{folder}: no such folder or file (give a folder of images, or `log`)")
        cands, problems = queue.from_folder([folder])
        for path, reason in problems:
            err.print(f"[yellow]skipped[/] {safe(path)}: {safe(reason)}")
        return cands, {"source": str(folder), "files": len(cands), "skipped": len(problems)}
    location = logstore.location(root())
    if location is None:
        raise fail("the inference log is off ($LESIONFLOW_INFERENCE_LOG=off): nothing to queue from it")
    start = inferencelog.window(since_hours)[0] if since_hours else None
    rows = inferencelog.read(location, start=start)
    cands, counts = queue.from_log(rows)
    if counts["without_image"]:
        err.print(
            f"[yellow]{counts['without_image']:,} of {counts['answers']:,} logged answer(s) kept no image[/] "
            f"({counts['disputed_without_image']} of them disputed): the service keeps images only with "
            "LESIONFLOW_LOG_IMAGES=1 (docs/labels.md)"
        )
    return cands, {"source": "inference log", "location": str(location), **counts}


@label_app.command("queue")
def queue_cmd(
    source: str = typer.Option(..., "--from", help="`log` (the inference log's stored images) or a folder of images."),
    budget: int = typer.Option(100, "--budget", min=1, help="How many images to queue."),
    model: str | None = typer.Option(None, "--model", "-m", help="Registry tag (default: the champion)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Queue folder (default: reports/label_queue/<time>)."),
    image_url: str | None = typer.Option(
        None,
        help="Where Label Studio finds the images, with {name} for the file name (e.g. "
        "https://bucket/queue/{name}); default: each image inside its task as a data URI.",
    ),
    since_hours: float | None = typer.Option(None, help="With --from log: only the last this many hours."),
) -> None:
    """Rank unlabelled images by how much a label would teach the model (disputed answers, refused
    images, then uncertainty and novelty against the training images) and write the queue as a CSV
    and Label Studio tasks."""
    from pipeline.core import params
    from pipeline.core.taxonomy import DIAGNOSIS_NAMES
    from pipeline.data import labelstudio
    from pipeline.labelling import queue

    m = resolve_model(model)
    layout = Layout(root())
    dest = out_dir or layout.reports("label_queue") / _stamp()
    if dest.exists():
        raise fail(f"{dest}: already exists (nothing is overwritten); name another --out")
    p = params.load_section("label_queue", layout.params_file)
    cands, source_counts = _candidates(source, since_hours)
    if not cands:
        raise fail(f"nothing to queue from {source}")
    predictor, index, threshold = _model_parts(m, p)
    q, chosen, problems = queue.build(predictor, index, cands, budget, p, threshold)
    for path, reason in problems:
        err.print(f"[yellow]skipped[/] {safe(path)}: {safe(reason)}")
    if q.empty:
        raise fail(f"no readable image among the {len(cands)} candidate(s)")
    tax = predictor.taxonomy
    meta = params.load_section("metadata", layout.params_file)
    config = labelstudio.label_config(list(tax.classes("dx")), list(meta.dx_types), DIAGNOSIS_NAMES)
    counts = {"budget": budget, "candidates": len(cands), "unreadable": len(problems), "queued": len(q),
              "reasons": q["reason"].value_counts().to_dict(), "sources": source_counts}  # fmt: skip
    queue.write(dest, q, chosen, queue.tasks(q, chosen, m.label, image_url), config, _summary(m, p, layout, counts))
    _show_queue(q)
    out.print(f"Queued {len(q)} of {len(cands)} image(s) -> {dest} (queue.csv, tasks.json, label_config.xml)")


def _model_parts(m: Any, p: Any) -> tuple[Any, Any, float]:
    """The model's predictor, its retrieval index and its operating threshold, or exit naming what
    is missing."""
    from pipeline.cli.predict import load_predictor
    from pipeline.model import retrieval

    predictor = load_predictor(m.path)
    try:
        index = retrieval.RetrievalIndex.for_model(m.path)
    except retrieval.RetrievalError as exc:
        raise fail(str(exc)) from None
    if m.threshold is None and p.uncertainty == "risk":
        raise fail(f"{m.path}: no operating threshold known for this model; label_queue.uncertainty risk needs one")
    return predictor, index, m.threshold if m.threshold is not None else 0.5  # 0.5: unused unless risk


def _summary(m: Any, p: Any, layout: Layout, counts: dict[str, Any]) -> dict[str, Any]:
    """queue.json: the model, the counts, the params and the code it came from."""
    from pipeline.core import lineage, params
    from pipeline.model import bundle

    return {"model": m.label, "model_md5": bundle.model_md5(m.path), **counts,
            "params": {"label_queue": params.to_dict(p)}, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "git": lineage.git_state(layout.root)}  # fmt: skip


def _show_queue(q: Any, shown: int = 15) -> None:
    t = Table("rank", "image", "reason", "uncertainty", "novelty", "model says", "clinician said",
              title="Labelling queue (first rows; queue.csv has them all)")  # fmt: skip
    for r in q.head(shown).itertuples(index=False):
        why = r.reason + (f" ({r.refused_because})" if r.refused_because else "")
        t.add_row(str(r.rank), r.image_id, why, f"{r.uncertainty:.2f}", f"{r.novelty:.2f}",
                  f"{r.predicted_dx} {r.p_predicted:.2f}", r.disputed_dx)  # fmt: skip
    out.print(t)


@label_app.command("import")
def import_cmd(
    export: Path = typer.Argument(
        ..., help="A Label Studio JSON export, or a CSV: image_id, dx, dx_type[, lesion_id]."
    ),
    images_dir: Path = typer.Option(..., "--images", help="Folder of the labelled images (a queue's images/)."),
    number_from: int | None = typer.Option(
        None, "--number-from", min=0, help="Number ids that do not match the data's pattern ISIC_<N>, ISIC_<N+1>, ..."
    ),
    commit: bool = typer.Option(False, "--commit", help="git commit data.dvc, naming the export."),
    push: bool = typer.Option(False, "--push", help="dvc push the new data version to the default remote."),
    retrain: bool = typer.Option(False, "--retrain", help="Then run the retraining flow (lesionflow run)."),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """Turn labelled images into a batch and ingest it: the same checks as `lesionflow ingest`, a
    new data version, the data diff, and with --retrain the retraining flow."""
    from pipeline.cli.data import ingest
    from pipeline.core import params
    from pipeline.core.metadata import read_csv
    from pipeline.data import labelimport, labelstudio

    layout = Layout(root())
    try:
        rows, unlabelled = labelstudio.read_export(export)
        if unlabelled:
            err.print(f"[yellow]{len(unlabelled)} task(s) not labelled, left out[/]: {', '.join(unlabelled[:5])}")
        columns = list(read_csv(layout.metadata_csv, "metadata table", nrows=0).columns)
        pattern = params.load_section("validate", layout.params_file).image_id_pattern
        dest = layout.reports("label_import") / _stamp()
        batch = labelimport.make_batch(rows, images_dir, dest, columns, pattern, number_from)
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    if len(batch.renamed):
        batch.renamed.to_csv(dest / "renamed.csv", index=False)
        out.print(f"{len(batch.renamed)} image id(s) numbered from {number_from}: {dest / 'renamed.csv'}")
    out.print(f"Batch of {len(rows)} labelled image(s) from {export.name}: {dest}")
    ingest(batch.images, batch.metadata, commit, push, False, progress)
    if retrain:
        from pipeline.cli.run import run

        run(retries=2, retry_delay=30.0, lock_timeout=0.0, package=True)


@label_app.command("decide")
def decide(
    image_id: str = typer.Argument(..., help="The image a label review suspected (reports/review/label_issues.csv)."),
    dx: str | None = typer.Option(None, "--dx", help="The corrected diagnosis (omit with --keep)."),
    keep: bool = typer.Option(False, "--keep", help="The given label stands."),
    reviewer: str = typer.Option(..., "--by", help="Who decided (name or role)."),
    note: str = typer.Option("", help="Why."),
) -> None:
    """Record a verdict on a label in labels/decisions.csv (git-tracked): the split applies a
    correction to the image's whole lesion, so the next `lesionflow run` trains on it."""
    from pipeline.core import params
    from pipeline.core.metadata import read_csv
    from pipeline.data import decisions

    if keep == (dx is not None):
        raise fail("give either --dx DIAGNOSIS (a correction) or --keep")
    layout = Layout(root())
    meta = read_csv(layout.metadata_csv, "metadata table", dtype=str)
    found = meta.loc[meta["image_id"] == image_id, "dx"]
    if found.empty:
        raise fail(f"{image_id}: not in {layout.metadata_csv}")
    diagnoses = list(params.load_taxonomy(layout.params_file).diagnoses)
    if dx is not None and dx not in diagnoses:
        raise fail(f"--dx {dx!r}: expected one of {', '.join(diagnoses)}")
    try:
        row = decisions.record(layout.label_decisions, image_id, decisions.KEPT if keep else decisions.CORRECTED,
                               str(found.iloc[0]), dx, reviewer, note)  # fmt: skip
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    what = f"kept {row['dx']}" if keep else f"corrected {row['dx_before']} -> {row['dx']} (its whole lesion)"
    out.print(f"{image_id}: {what}; recorded in {layout.label_decisions}. Next: git commit it, then lesionflow run")
