"""``lesionflow site add | list``: an operating point per site, kept with a stored model
(:mod:`pipeline.audit.sites` computes it, :mod:`pipeline.model.sites` owns the records, the service
applies it to a request naming the site)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline.cli.base import app, fail, out, resolve_model, root, safe, show
from pipeline.cli.registry_views import print_sites
from pipeline.core.errors import LesionflowError
from pipeline.core.layout import Layout

site_app = typer.Typer(
    help="Operating points per site: measure one on a site's labelled images, list them.", no_args_is_help=True
)
app.add_typer(site_app, name="site")


@site_app.command("add")
def add(
    name: str = typer.Argument(..., help="The site's name (letters, digits, . _ -): what requests send as `site`."),
    images_dir: Path = typer.Argument(
        ..., help="Folder of the site's labelled images (JPEG/PNG, file stem = image_id)."
    ),
    labels_csv: Path = typer.Argument(..., help="CSV: image_id, dx; lesion_id for intervals over lesions."),
    model: str | None = typer.Option(None, "--model", "-m", help="Registry tag (default: the champion)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Report folder (default: reports/sites/NAME)."),
    replace: bool = typer.Option(
        False, help="Measure again a site already recorded (the earlier record is kept inside)."
    ),
    build: bool = typer.Option(
        True, help="Rebuild the Bento when the model is the champion (it then serves the site)."
    ),
) -> None:
    """Measure the model on a site's labelled images (validate-external) and record the threshold
    that restores the target sensitivity there, with its lesion-bootstrap interval; refused when the
    site has too few malignant cases (params.yaml serving.site_interval_width)."""
    from pipeline.audit import sites
    from pipeline.cli.external import show_summary
    from pipeline.core import params

    for given, what in ((images_dir, "images folder"), (labels_csv, "labels CSV")):
        if not given.exists():
            raise fail(f"{given}: no such {what}")
    m = _model(model, name, replace)
    layout = Layout(root())
    inputs = _inputs(name, m, images_dir, labels_csv, out_dir, layout)
    try:
        serving, tax = params.load_section("serving", layout.params_file), params.load_taxonomy(layout.params_file)
        r = sites.onboard(inputs, serving, tax)
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    show_summary(r)
    show_site(r["site"])
    out.print(f"Report: {inputs.out_dir / 'report.md'}")
    _record(m, r["site"], replace, build)


def _model(model: str | None, name: str, replace: bool) -> Any:
    """The stored model a site is added to, when the name is valid and not yet recorded (or replaced)."""
    from pipeline.model.sites import check_name, path

    m = resolve_model(model)
    try:
        check_name(name)
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    if not m.packaged:
        raise fail(f"a site is recorded with a stored model (--model TAG), not the folder {m.path}")
    if path(m.path, name).exists() and not replace:
        raise fail(f"site {name!r} is already recorded with {m.label}: pass --replace to measure it again")
    return m


def _inputs(name: str, m: Any, images_dir: Path, labels_csv: Path, out_dir: Path | None, layout: Layout) -> Any:
    """The external validation underneath: the model, the site's images and labels, the report's folder."""
    from pipeline.audit import external
    from pipeline.cli.external import claim
    from pipeline.core import params

    return external.ExternalInputs(
        name=name,
        model_dir=m.path,
        model_label=m.label,
        images_dir=images_dir.resolve(),
        labels_csv=labels_csv.resolve(),
        out_dir=claim(out_dir.resolve() if out_dir is not None else layout.reports("sites") / name),
        evaluate=params.load_section("evaluate", layout.params_file),
        monitor=params.load_section("monitor", layout.params_file),
    )


def _record(m: Any, record: dict[str, Any], replace: bool, build: bool) -> None:
    """Keep the site with the stored model, and rebuild the champion's Bento so that it serves it."""
    from pipeline.registry import bento
    from pipeline.registry.champions import champion
    from pipeline.registry.trace import record_site

    try:
        where = record_site(m.label, record, replace)
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    out.print(f"Recorded with {safe(m.label)}: {where} (lesionflow site list)")
    champ = champion()
    if not build or champ is None or champ["tag"] != m.label:
        out.print(
            "Not the champion's Bento: a service of this model sees the site once restarted on a Bento built after now."
        )
        return
    try:
        out.print(
            f"Bento: {bento.build_bento(root())}   (lesionflow serve: requests may now name site {record['name']!r})"
        )
    except LesionflowError as exc:
        raise fail(f"the site is recorded but the Bento build failed: {exc}") from None


def show_site(s: dict[str, Any]) -> None:
    """One site's operating point in words."""
    lo, hi = s["threshold_interval"]
    verdict = "[green]suitable[/]" if s["suitable"] else f"[red]not suitable[/]: {safe(s['reason'])}"
    out.print(
        f"Site {safe(s['name'])}: threshold {show(s['threshold'])} ({round(100 * s['confidence'])}% interval "
        f"{show(lo)} - {show(hi)}) gives sensitivity {show(s['sensitivity'], 3)} and specificity "
        f"{show(s['specificity'], 3)} on its {s['n_malignant']} malignant of {s['n_images']} images; {verdict}"
    )


@site_app.command("list")
def list_sites(
    model: str | None = typer.Option(None, "--model", "-m", help="Registry tag (default: the champion)."),
) -> None:
    """The sites recorded with a model: threshold and its interval, sensitivity, specificity, suitable or not."""
    from pipeline.model import sites

    m = resolve_model(model)
    try:
        found = sites.load(m.path)
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    if not found:
        out.print(f"No sites recorded with {safe(m.label)} (lesionflow site add NAME IMAGES LABELS)")
        return
    print_sites([s.record for s in found.values()], f"Sites of {m.label}")
