"""``lesionflow ingest`` and ``lesionflow data diff``: new labelled images in as a new DVC data
version (:mod:`pipeline.data.ingest`), and what one data version adds over another
(:mod:`pipeline.audit.datadiff`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from pipeline.cli.base import app, err, fail, out, root
from pipeline.core import lineage
from pipeline.core.errors import EXIT_FAILED
from pipeline.core.layout import Layout

data_app = typer.Typer(help="Data versions: what one adds over another.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def champion_commit() -> str | None:
    """The git commit the champion was trained on (None without a champion)."""
    from pipeline.registry.champions import champion

    champ = champion()
    commit = (champ or {}).get("labels", {}).get("git_commit")
    return commit if commit and commit != "unknown" else None


def print_diff(d: dict) -> None:
    """The diff's headline numbers and its per-diagnosis table."""
    im = d["images"]
    out.print(
        f"Data {d['rev_a']} -> {d['rev_b']}: {im['before']:,} -> {im['after']:,} images "
        f"(+{im['added']:,}, -{im['removed']:,}); {len(d['new_lesions']):,} new lesion(s)"
        + (f", {len(d['new_patients']):,} new patient(s)" if d.get("new_patients") is not None else "")
    )
    t = Table("dx", "before", "after", "change", title="Images per diagnosis")
    for r in d["dx"]:
        t.add_row(r["value"], str(r["before"]), str(r["after"]), f"{r['change']:+d}")
    out.print(t)
    st = d.get("image_statistics") or {}
    if st.get("checked"):
        drifted = ", ".join(r["feature"] for r in st["drifted"]) or "none"
        out.print(
            f"Image statistics of the added images vs the old: drift share {st['drift_share']:.2f}; drifted: {drifted}"
        )


@data_app.command("diff")
def diff(
    rev_a: str = typer.Argument(None, help="Git revision of the old data version (default: the champion's commit)."),
    rev_b: str = typer.Argument("workspace", help="Git revision of the new one (default: the workspace)."),
    out_dir: Path = typer.Option(None, "--out", help="Folder for data_diff.json and data_diff.md."),
    image_stats: bool = typer.Option(True, help="Compare the added images' statistics with the old ones'."),
) -> None:
    """Images added/removed (dvc diff), counts per class and split, new lesions and patients,
    metadata and image-statistics shifts, between two data versions."""
    from pipeline.audit import datadiff

    layout = Layout(root())
    if rev_a is None:
        rev_a = champion_commit()
        if rev_a is None:
            raise fail("no champion to compare with: name the old revision (lesionflow data diff REV_A [REV_B])")
    try:
        d = datadiff.diff(layout, rev_a, rev_b, image_stats=image_stats)
    except datadiff.DataDiffError as exc:
        raise fail(str(exc)) from None
    print_diff(d)
    dest = out_dir or layout.reports("data_diff")
    json_path, md_path = datadiff.write(d, dest)
    out.print(f"Report: {md_path}, {json_path}")


@app.command()
def ingest(
    folder: Path = typer.Argument(..., help="Folder of the new images."),
    metadata: Path = typer.Option(..., "--metadata", help="CSV of the new images' rows (the data's columns)."),
    commit: bool = typer.Option(False, "--commit", help="git commit data.dvc, naming the batch."),
    push: bool = typer.Option(False, "--push", help="dvc push the new data version to the default remote."),
    allow_near_duplicates: bool = typer.Option(
        False, help="Accept near-duplicates of existing images under other lesions (the split keeps them together)."
    ),
    progress: bool = typer.Option(True, help="Progress bars."),
) -> None:
    """Check a batch of new labelled images with the data contract and against the current data,
    then merge it into data/ as a new DVC data version (all or nothing)."""
    from pipeline.data import ingest as ing

    layout = Layout(root())
    for path, what in ((folder, "image folder"), (metadata, "metadata table")):
        if not path.exists():
            raise fail(f"{path}: {what} not found")
    head = _head(layout)
    try:
        checked = ing.check_batch(metadata, folder, layout, allow_near_duplicates=allow_near_duplicates,
                                  progress=progress)  # fmt: skip
    except ing.LesionflowError as exc:
        raise fail(str(exc)) from None
    if not checked.passed:
        err.print(checked.failures())
        err.print(f"[bold red]Refused[/]: nothing was changed in {layout.data_dir} or {layout.data_pointer}")
        raise typer.Exit(EXIT_FAILED)
    for c in checked.batch.warnings + [c for c in checked.against_data if c.kind == "warning"]:
        err.print(f"[yellow]warning[/]: {c.description}: " + "; ".join(c.examples))
    try:
        versions = ing.apply(checked, layout)
    except ing.IngestError as exc:
        raise fail(f"{exc}; {layout.data_dir} and {layout.data_pointer} were restored") from None
    n = len(checked.files)
    out.print(
        f"Ingested {n:,} image(s) of {checked.rows['lesion_id'].nunique():,} lesion(s) from {folder}: "
        f"data version {versions['before']} -> {versions['after']} ({checked.seconds:.1f} s of checks)"
    )
    _record(layout, f"Data: ingest {folder.name} (+{n} images, {metadata.name})", commit, push)
    _diff_after_ingest(layout, champion_commit() or head)
    out.print("Next: lesionflow run (retrains on the new data version; the gates decide)")


def _record(layout: Layout, message: str, commit: bool, push: bool) -> None:
    """``git commit`` the data pointer and/or ``dvc push`` the version, as asked."""
    from pipeline.data import ingest as ing

    try:
        if commit:
            out.print(f"Committed {layout.data_pointer.name}: {ing.commit(layout, message)[:12]}")
        if push:
            ing.push(layout)
            out.print("Pushed the data version to the default DVC remote")
    except ing.IngestError as exc:  # the new data version stands; only recording it failed
        raise fail(
            f"the new data version is in place ({layout.data_pointer} updated), but {exc}. "
            f"Finish by hand: git add {layout.data_pointer.name} && git commit; lesionflow dvc push"
        ) from None


def _diff_after_ingest(layout: Layout, base: str | None) -> None:
    """The new data version against the champion's (or the last commit's), as a table and report."""
    from pipeline.audit import datadiff

    if not base:
        return
    try:
        d = datadiff.diff(layout, base, datadiff.WORKSPACE, image_stats=True)
    except datadiff.DataDiffError as exc:
        err.print(f"[yellow]data diff not available[/]: {exc}")
        return
    print_diff(d)
    out.print("Report: " + str(datadiff.write(d, layout.reports("data_diff"))[1]))


def _head(layout: Layout) -> str | None:
    commit = lineage.git_state(layout.root)["commit"]
    return None if commit == "unknown" else commit
