"""``lesionflow similar``: the confirmed training cases most similar to an image
(:mod:`pipeline.model.retrieval`), as a table and optionally a contact sheet PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from pipeline.cli import base
from pipeline.cli.base import DISCLAIMER, app, fail, out, show
from pipeline.cli.predict import resolve_model


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
    from pipeline.model.retrieval import ATTRIBUTION

    draw.text((6, cell + 32), ATTRIBUTION, fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


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
    from pipeline.core import images, lineage
    from pipeline.core.layout import Layout
    from pipeline.model import inference
    from pipeline.model.retrieval import ATTRIBUTION, RetrievalError, RetrievalIndex
    from pipeline.serving.registry import RETRIEVAL_DIR

    model_dir, label, _ = resolve_model(model)
    try:
        rgb = images.decode_rgb(image, str(image))
        predictor = inference.load_model(model_dir)
        images.check_size(rgb, predictor.size_limits, str(image))
        packaged = model_dir / RETRIEVAL_DIR  # a stored model carries its index; else the stage's
        folder = packaged if packaged.is_dir() else Layout(base.root()).retrieval_dir
        index = RetrievalIndex.load(folder, model_md5=lineage.file_md5(model_dir / "model.pt"))
    except (images.ImageError, inference.ModelLoadError, RetrievalError) as exc:
        raise fail(str(exc)) from None
    pred = predictor.predict([rgb], tta=False)
    if pred["in_distribution"] is not None and not pred["in_distribution"][0]:
        from pipeline.model.ood import MESSAGE

        raise fail(f"{image}: {MESSAGE} (no similar cases either)", code=1)
    cases = index.query(pred["embeddings"], k or int(index.meta.get("k", 6)))[0]
    t = Table(
        "#",
        "training case",
        "diagnosis",
        "confirmed by",
        "similarity",
        "age",
        "sex",
        "site",
        title=f"Most similar training lesions to {image.name} (model {label})",
        caption=f"{ATTRIBUTION} {DISCLAIMER}",
    )
    for i, c in enumerate(cases, 1):
        d = c.to_dict()
        t.add_row(
            str(i),
            c.image_id,
            c.dx,
            d["confirmation"],
            show(c.similarity, 3),
            show(c.age, 0),
            c.sex or "-",
            c.localization or "-",
        )
    out.print(t)
    if sheet is not None:
        contact_sheet(rgb, cases, index, sheet)
        out.print(f"Contact sheet: {sheet}")
