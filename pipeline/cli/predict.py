"""``lesionflow predict``: classify local images with the champion, a registry tag or a model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import typer
from rich.table import Table

from pipeline.cli.base import DISCLAIMER, app, err, fail, out, resolve_model, root, safe, show
from pipeline.core import fsutil, images
from pipeline.core.errors import EXIT_FAILED
from pipeline.core.layout import Layout
from pipeline.core.predictions import (
    DECISION,
    IN_DISTRIBUTION,
    P_MALIGNANT,
    QUALITY,
    pred_column,
    prob_column,
    split_reasons,
)
from pipeline.model.ood import MESSAGE as OOD_MESSAGE
from pipeline.model.quality import REASONS


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
        if refused := split_reasons(r.get(QUALITY)):  # no risk estimate for an image the model cannot judge
            why = "; ".join(REASONS.get(code, code) for code in refused)
            table.add_row(safe(Path(r["file"]).name), "-", "-", "-", "-", f"[yellow]not judged: {why}[/]")
            continue
        if r.get(IN_DISTRIBUTION) is False:
            table.add_row(
                safe(Path(r["file"]).name), "-", "-", "-", "-", "[yellow]not judged: unlike the training images[/]"
            )
            continue
        table.add_row(
            safe(Path(r["file"]).name),
            dx or "-",
            show(r.get(prob_column("dx", dx)) if dx else None, 3),
            r.get(pred_column("risk"), "-"),
            show(r[P_MALIGNANT], 3),
            f"[bold red]{r[DECISION]}[/]" if r[DECISION] == positive else (r[DECISION] or "-"),
        )
    out.print(table)
    if IN_DISTRIBUTION in rows and (~rows[IN_DISTRIBUTION].astype(bool)).any():
        n = int((~rows[IN_DISTRIBUTION].astype(bool)).sum())
        out.print(f"{n} image(s) not judged: {OOD_MESSAGE} (probabilities in the CSV, decision empty)")
    if QUALITY in rows and (rows[QUALITY] != "").any():
        n = int((rows[QUALITY] != "").sum())
        out.print(
            f"{n} image(s) refused by the image-quality checks (reasons in the CSV's {QUALITY} column, decision empty)"
        )


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
    log: bool = typer.Option(
        False,
        "--log",
        help="Also write each answer to the inference log, as the service does (for monitoring and audit).",
    ),
    site: str | None = typer.Option(
        None, "--site", help="Decide at this site's threshold (lesionflow site list), as the service does."
    ),
) -> None:
    """Classify local images with the champion or --model; unreadable files are skipped. With
    --dask-address or --dask-workers the files are sharded over Dask workers (same rows)."""
    m = resolve_model(model)
    thr, chosen = _site(m, site, threshold) if site else (_threshold(m, threshold), None)
    _claim(out_csv)
    files, problems = _images(paths)
    predictor = load_predictor(m.path)
    dask = {"dask_address": dask_address, "workers": dask_workers} if dask_address or dask_workers else None
    rows, unread = predict_rows(predictor, m.path, files, float(thr), batch_size, tta, dask)
    for path, reason in problems + unread:
        err.print(f"[yellow]skipped[/] {safe(path)}: {safe(reason)}")
    if len(rows):
        where = _at_site(rows, chosen)
        rows["model"] = m.label
        show_table(rows, m.label + where, float(thr), predictor.taxonomy.binary_positive, shown)
    if log and len(rows):
        _log(rows, m)
    write_rows(rows, out_csv, shown, len(problems + unread))


def _log(rows: pd.DataFrame, m: Any) -> None:
    """``--log``: the rows' answers to the inference log
    (:func:`pipeline.monitoring.inferencelog.log_prediction_rows`)."""
    from pipeline.core import params
    from pipeline.monitoring import inferencelog, logstore

    base = root()
    location = logstore.location(base)
    if location is None:
        raise fail(f"--log: the inference log is off (${logstore.LOCATION_ENV}=off)")
    policy = params.load_section("monitor", Layout(base).params_file).log_metadata
    written, failed = inferencelog.log_prediction_rows(rows, m.path, m.label, location, policy)
    out.print(f"Logged {written} answer(s) to {location}" + (f"; {failed} could not be logged" if failed else ""))


def _images(paths: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files under ``paths`` and what was skipped; fails, naming them, when none is an image."""
    files, problems = images.list_images(paths)
    if not files:  # nothing the user pointed at is an image: say which, in one line
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise fail(f"{problems[0][0]}: {problems[0][1]}{more}")
    return files, problems


def _site(m: Any, name: str, threshold: float | None) -> tuple[float, Any]:
    """``--site``: the site's threshold and record (:mod:`pipeline.model.sites`), or exit naming
    the problem (with --threshold, an unknown site, a malformed record)."""
    from pipeline.model import sites
    from pipeline.model.bundle import ModelLoadError

    if threshold is not None:
        raise fail("--site and --threshold both set a threshold: give one")
    try:
        found = sites.choose(sites.load(m.path), name)
    except (sites.SiteError, ModelLoadError) as exc:
        raise fail(f"--site: {exc}") from None
    return found.threshold, found


def load_predictor(model_dir: Path) -> Any:
    """The model's predictor (THE prediction path), or exit naming what is wrong with its folder."""
    from pipeline.model import inference

    try:
        return inference.load_model(model_dir)
    except inference.ModelLoadError as exc:
        raise fail(str(exc)) from None


def _at_site(rows: pd.DataFrame, site: Any) -> str:
    """The rows as the service answers at ``site`` (none: unchanged): a ``site`` column, and no
    decision where the site is not suitable for the model. Returns what the table's title adds."""
    if site is None:
        return ""
    rows["site"] = site.name
    if not site.suitable:
        rows[DECISION] = None
        out.print(f"[yellow]{safe(site.message)}[/]: probabilities only (decision empty)")
    return f", site {site.name}"


def _threshold(m: Any, given: float | None) -> float:
    """The threshold to decide at: ``--threshold``, else the model's operating point."""
    thr = given if given is not None else m.threshold
    if thr is None:
        raise fail(
            f"{m.path}: no operating threshold known for this model (it was never evaluated); "
            "pass --threshold or use a packaged model"
        )
    return float(thr)


def _claim(out_csv: Path | None) -> None:
    """Refuse, before any work, an ``--out`` file this command did not write."""
    if out_csv is not None:
        try:
            fsutil.claim_file(out_csv, is_predictions_csv)
        except fsutil.OutputError as exc:
            raise fail(str(exc)) from None


def write_rows(rows: pd.DataFrame, out_csv: Path | None, shown: int, skipped: int) -> None:
    """Write the rows to ``out_csv`` (when given) and say what was predicted and skipped; exit 1
    when no image could be read."""
    if len(rows) > shown:
        out.print(f"... {len(rows) - shown} more rows" + (f" in {out_csv}" if out_csv else " (use --out FILE.csv)"))
    if out_csv is not None:
        fsutil.atomic_write_text(out_csv, rows.to_csv(index=False))  # claimed before predicting
        out.print(f"Wrote {len(rows)} row(s) to {out_csv}")
    out.print(f"{len(rows)} predicted, {skipped} skipped.")
    if not len(rows):
        raise fail("no image could be read", code=EXIT_FAILED)


def is_predictions_csv(path: Path) -> bool:
    """Whether ``path`` is a predictions CSV this command wrote (its header: ``file``, the
    prediction columns, ``model``)."""
    with open(path, "rb") as fh:
        header = fh.readline(64 << 10)
    return header.startswith(b"file,") and P_MALIGNANT.encode() in header and header.rstrip().endswith(b",model")


def predict_rows(
    predictor: Any,
    model_dir: Path,
    files: list[Path],
    threshold: float,
    batch_size: int,
    tta: bool | None,
    dask: dict[str, Any] | None,
) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """The prediction rows of ``files`` and the unreadable ones: in this process, or sharded over
    Dask when ``dask`` holds the cluster's address or worker count (the same rows)."""
    from pipeline.model import batchpredict

    if dask is None:
        return batchpredict.predict_files(predictor, files, threshold, batch_size, tta=tta)
    from flows.predict import predict_on_dask

    return predict_on_dask(model_dir, files, threshold, batch_size, tta, **dask)
