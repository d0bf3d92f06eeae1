"""``lesionflow validate-external``: a packaged model on someone else's labelled images
(:mod:`pipeline.audit.external`)."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.table import Table

from pipeline.cli.base import DISCLAIMER, app, fail, out, resolve_model, root, safe, show
from pipeline.core import fsutil
from pipeline.core.errors import LesionflowError
from pipeline.core.layout import Layout


@app.command("validate-external")
def validate_external(
    images_dir: Path = typer.Argument(..., help="Folder of the labelled images (JPEG/PNG, file stem = image_id)."),
    labels_csv: Path = typer.Argument(..., help="CSV: image_id, dx; optional lesion_id, age, sex, localization."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Registry tag or model directory (default: the champion)."
    ),
    name: str | None = typer.Option(None, help="Name of the report (default: the images folder's name)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Output folder (default: reports/external/NAME)."),
    record: bool = typer.Option(
        False, "--record", help="Keep the result with the stored model (shown by `lesionflow trace`)."
    ),
) -> None:
    """Evaluate a packaged model on an external labelled set: metrics with CIs, what the operating
    threshold gives there, the threshold restoring the target sensitivity, OOD share and drift."""
    from pipeline.audit import external
    from pipeline.core import params

    for path, what in ((images_dir, "images folder"), (labels_csv, "labels CSV")):
        if not path.exists():
            raise fail(f"{path}: no such {what}")
    m = resolve_model(model)
    model_dir, label = m.path, m.label
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name or images_dir.resolve().name).strip("-") or "external"
    layout = Layout(root())
    out_dir = claim(out_dir.resolve() if out_dir is not None else layout.reports("external") / name)
    inputs = external.ExternalInputs(
        name=name,
        model_dir=model_dir,
        model_label=label,
        images_dir=images_dir.resolve(),
        labels_csv=labels_csv.resolve(),
        out_dir=out_dir,
        evaluate=params.load_section("evaluate", layout.params_file),
        monitor=params.load_section("monitor", layout.params_file),
    )
    try:
        r = external.validate_external(inputs, params.load_taxonomy(layout.params_file))
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    show_summary(r)
    out.print(f"Report: {inputs.out_dir / 'report.md'} (and report.html, summary.json, predictions.csv)")
    if record:
        from pipeline.registry.trace import record_external

        if not m.packaged:
            raise fail(f"--record needs a stored model (--model TAG), not the folder {model_dir}")
        path = record_external(label, name, r)
        out.print(f"Recorded with {label}: {path} (lesionflow trace {label})")


def claim(folder: Path) -> Path:
    """The report's folder, claimed before any work: a folder of someone else's files is never replaced."""
    try:
        return fsutil.claim_folder(folder)
    except fsutil.OutputError as exc:
        raise fail(str(exc)) from None


def show_summary(r: dict) -> None:
    """The external figures next to the internal ones."""
    internal, at, fix = (r.get("internal") or {}).get("test") or {}, r["model_threshold"], r["restoring_target"]
    t = Table(
        "",
        "sensitivity",
        "specificity",
        "threshold",
        title=safe(f"{r['name']}: {r['n_images']} images, model {r['model']}"),
        caption=DISCLAIMER,
    )
    t.add_row(
        "internal test split",
        show(internal.get("sensitivity"), 3),
        show(internal.get("specificity"), 3),
        show(r["threshold"]),
    )
    t.add_row(
        "[bold]this set, model threshold[/]",
        show(at["sensitivity"], 3),
        show(at["specificity"], 3),
        show(r["threshold"]),
    )
    t.add_row(
        "this set, restoring the target",
        show(fix["sensitivity"], 3),
        show(fix["specificity"], 3),
        show(fix["threshold"]),
    )
    out.print(t)
    b = r["metrics"].get("binary", {})
    flagged, refused = r.get("ood_flagged_share"), r.get("quality_refused_share")
    out.print(
        f"binary ROC-AUC {show(b.get('roc_auc'), 3)}; dx balanced accuracy "
        f"{show(r['metrics'].get('dx', {}).get('balanced_accuracy'), 3)}; OOD flagged "
        f"{'-' if flagged is None else f'{100 * flagged:.1f}%'}; refused by the image-quality checks "
        f"{'-' if refused is None else f'{100 * refused:.1f}%'}; drift: {r['drift'].get('decision') or 'not checked'}"
    )
