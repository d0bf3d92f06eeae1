"""``lesionflow predict``: classify local images with the champion, a registry tag or a model folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer
from rich.table import Table

from pipeline.cli import base
from pipeline.cli.base import DISCLAIMER, app, err, fail, out, show
from pipeline.core import fsutil, images, lineage
from pipeline.core.errors import EXIT_FAILED
from pipeline.core.layout import Layout
from pipeline.core.predictions import (
    DECISION,
    IN_DISTRIBUTION,
    P_MALIGNANT,
    pred_column,
    prob_column,
)
from pipeline.model.ood import MESSAGE as OOD_MESSAGE


def resolve_model(model: str | None) -> tuple[Path, str, float | None]:
    """(directory with model.pt + config.json, label, threshold or None) of the champion, a
    directory or a registry tag."""
    from pipeline.serving import registry

    if model is None:
        champ = registry.champion()
        if champ is None:
            raise fail("no champion yet: run `lesionflow run` first, or pass --model DIR_OR_TAG")
        return Path(champ["path"]), champ["tag"], champ["metadata"].get("threshold")
    if Path(model).is_dir():
        d = Path(model)
        op = fsutil.read_json(d / registry.OPERATING_POINT_FILE)
        if op is None and base.ROOT is not None:  # an unpackaged model: evaluate's operating point if it judged it
            cand = fsutil.read_json(Layout(base.ROOT).evaluate_dir / registry.OPERATING_POINT_FILE)
            if cand and (d / "model.pt").exists() and cand.get("model_md5") == lineage.file_md5(d / "model.pt"):
                op = cand
        return d, str(d), (op or {}).get("threshold")
    try:
        d = registry.describe(model)
    except registry.RegistryError as exc:
        raise fail(f"--model {model}: not a directory, and {exc}") from None
    return Path(d["path"]), d["tag"], d.get("threshold")


def show_table(rows: pd.DataFrame, label: str, threshold: float, positive: str, shown: int) -> None:
    table = Table(
        "file",
        "diagnosis",
        "p",
        "risk class",
        f"p({positive})",
        "decision",
        title=f"{len(rows)} image(s), model {label}, threshold {threshold:.4f}",
        caption=DISCLAIMER,
    )
    for r in rows.head(shown).to_dict("records"):
        dx = r.get(pred_column("dx"))
        if r.get(IN_DISTRIBUTION) is False:  # no risk estimate for an image the model cannot judge
            table.add_row(Path(r["file"]).name, "-", "-", "-", "-", "[yellow]not judged: unlike the training images[/]")
            continue
        table.add_row(
            Path(r["file"]).name,
            dx or "-",
            show(r.get(prob_column("dx", dx)) if dx else None, 3),
            r.get(pred_column("risk"), "-"),
            show(r[P_MALIGNANT], 3),
            f"[bold red]{r[DECISION]}[/]" if r[DECISION] == positive else r[DECISION],
        )
    out.print(table)
    if IN_DISTRIBUTION in rows and (~rows[IN_DISTRIBUTION].astype(bool)).any():
        n = int((~rows[IN_DISTRIBUTION].astype(bool)).sum())
        out.print(f"{n} image(s) not judged: {OOD_MESSAGE} (probabilities in the CSV, decision empty)")


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="Image files (JPEG/PNG) or folders searched recursively."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model directory or registry tag (default: the champion)."
    ),
    out_csv: Path | None = typer.Option(
        None, "--out", "-o", help="Write every class probability and the decision per image to this CSV."
    ),
    threshold: float | None = typer.Option(
        None, min=0.0, max=1.0, help="Override the model's operating threshold on p(malignant)."
    ),
    tta: bool | None = typer.Option(
        None, "--tta/--no-tta", help="Flip test-time augmentation (default: the model's setting)."
    ),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    shown: int = typer.Option(50, "--show", min=0, help="Rows shown on screen (the CSV has them all)."),
    dask_address: str | None = typer.Option(
        None, "--dask-address", help="Shard the files over an existing Dask cluster (tcp://scheduler:8786)."
    ),
    dask_workers: int = typer.Option(
        0, "--dask-workers", min=0, help="Shard the files over a local Dask cluster of this many worker processes."
    ),
) -> None:
    """Classify local images with the champion or --model; unreadable files are skipped. With
    --dask-address or --dask-workers the files are sharded over Dask workers (same rows)."""
    from pipeline.model import batchpredict, inference

    model_dir, label, thr = resolve_model(model)
    thr = threshold if threshold is not None else thr
    if thr is None:
        raise fail(
            f"{model_dir}: no operating threshold known for this model (no operating_point.json); "
            "pass --threshold or use a packaged model"
        )
    files, problems = images.list_images(paths)
    try:
        predictor = inference.load_model(model_dir)
    except inference.ModelLoadError as exc:
        raise fail(str(exc)) from None
    if dask_address or dask_workers:
        from flows.predict import predict_on_dask

        rows, unread = predict_on_dask(
            model_dir, files, float(thr), batch_size, tta, dask_address=dask_address, workers=dask_workers
        )
    else:
        rows, unread = batchpredict.predict_files(predictor, files, float(thr), batch_size, tta=tta)
    problems += unread
    for path, reason in problems:
        err.print(f"[yellow]skipped[/] {path}: {reason}")
    if len(rows):
        rows["model"] = label
        show_table(rows, label, float(thr), predictor.taxonomy.binary_positive, shown)
        if len(rows) > shown:
            out.print(f"... {len(rows) - shown} more rows" + (f" in {out_csv}" if out_csv else " (use --out FILE.csv)"))
    if out_csv is not None:
        fsutil.atomic_write_text(out_csv, rows.to_csv(index=False))
        out.print(f"Wrote {len(rows)} row(s) to {out_csv}")
    out.print(f"{len(rows)} predicted, {len(problems)} skipped.")
    if not len(rows):
        raise fail("no image could be read", code=EXIT_FAILED)
