"""``lesionflow similar``: the confirmed training cases most similar to an image
(:mod:`pipeline.model.retrieval`), as a table and optionally a contact sheet PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from pipeline.cli import base
from pipeline.cli.base import DISCLAIMER, app, fail, out, resolve_model, show


def contact_sheet(query: Any, cases: list[Any], index: Any, path: Path, cell: int = 160) -> None:
    """A PNG: the query image, then each case's thumbnail with its diagnosis, confirmation and
    similarity underneath."""
    from PIL import Image, ImageDraw

    tiles = [("query", Image.fromarray(query), "")]
    for c in cases:
        thumb = Image.open(io.BytesIO(index.thumbnail(c.image_id))).convert("RGB")
        tiles.append((f"{c.dx} ({c.dx_type})", thumb, f"similarity {c.similarity:.3f}"))
    sheet = Image.new("RGB", (cell * len(tiles), cell + 44), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (title, img, sub) in enumerate(tiles):
        img.thumbnail((cell - 8, cell - 8))
        sheet.paste(img, (i * cell + (cell - img.width) // 2, 4))
        draw.text((i * cell + 6, cell + 2), title, fill="black")
        draw.text((i * cell + 6, cell + 18), sub, fill="dimgray")
    from PIL import PngImagePlugin

    from pipeline.model.retrieval import ATTRIBUTION

    draw.text((6, cell + 32), ATTRIBUTION, fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SHEET_SOFTWARE)
    sheet.save(path, format="PNG", pnginfo=info)


#: The PNG text of a contact sheet this command wrote (a later one may replace it, nothing else).
SHEET_SOFTWARE = "lesionflow similar"


def is_contact_sheet(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.info.get("Software") == SHEET_SOFTWARE
    except (OSError, UnidentifiedImageError):
        return False


def cases_table(cases: list[Any], title: str, attribution: str) -> Table:
    """The similar cases as a table: diagnosis, how it was confirmed, similarity, the case's metadata."""
    t = Table(
        "#",
        "training case",
        "diagnosis",
        "confirmed by",
        "similarity",
        "age",
        "sex",
        "site",
        title=title,
        caption=f"{attribution} {DISCLAIMER}",
    )
    for i, c in enumerate(cases, 1):
        t.add_row(
            str(i),
            c.image_id,
            c.dx,
            c.to_dict()["confirmation"],
            show(c.similarity, 3),
            show(c.age, 0),
            c.sex or "-",
            c.localization or "-",
        )
    return t


@app.command()
def similar(
    image: Path = typer.Argument(..., help="A dermoscopic image (JPEG/PNG)."),
    k: int | None = typer.Option(None, "--k", min=1, max=50, help="How many cases (default: the index's, 6)."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Registry tag or model directory (default: the champion)."
    ),
    sheet: Path | None = typer.Option(None, "--sheet", help="Also write a contact sheet PNG here."),
) -> None:
    """The confirmed training cases most similar to IMAGE (one image per lesion)."""
    from pipeline.core import fsutil, images
    from pipeline.core.layout import Layout
    from pipeline.model import bundle, inference
    from pipeline.model.retrieval import ATTRIBUTION, RetrievalError, RetrievalIndex

    m = resolve_model(model)
    try:
        if sheet is not None:
            fsutil.claim_file(sheet, is_contact_sheet)
        rgb = images.decode_rgb(image, str(image))
        predictor = inference.load_model(m.path)
        images.check_size(rgb, predictor.size_limits, str(image))
        if (m.path / bundle.RETRIEVAL_DIR).is_dir():  # a stored model carries its index
            index = RetrievalIndex.for_model(m.path)
        else:  # a trained model's folder: the retrieval stage's index, if built for it
            index = RetrievalIndex.load(Layout(base.root()).retrieval_dir, model_md5=bundle.model_md5(m.path))
    except (images.ImageError, inference.ModelLoadError, RetrievalError, fsutil.OutputError) as exc:
        raise fail(str(exc)) from None
    pred = predictor.predict([rgb], tta=False)
    if pred.get("quality_reasons") and pred["quality_reasons"][0]:
        from pipeline.model.quality import message

        raise fail(f"{image}: {message(pred['quality_reasons'][0])} (no similar cases either)", code=1)
    if pred["in_distribution"] is not None and not pred["in_distribution"][0]:
        from pipeline.model.ood import MESSAGE

        raise fail(f"{image}: {MESSAGE} (no similar cases either)", code=1)
    cases = index.query(pred["embeddings"], k or int(index.meta.get("k", 6)))[0]
    out.print(cases_table(cases, f"Most similar training lesions to {image.name} (model {m.label})", ATTRIBUTION))
    if sheet is not None:
        contact_sheet(rgb, cases, index, sheet)
        out.print(f"Contact sheet: {sheet}")
