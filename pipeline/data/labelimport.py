"""Labels back: labelled rows (a Label Studio export or a CSV, :mod:`pipeline.data.labelstudio`)
and their image files become a batch that ``lesionflow ingest`` takes (:mod:`pipeline.data.ingest`).

:func:`make_batch` writes ``images/<image_id>.jpg`` (a JPEG copied byte for byte, any other
format re-encoded as a JPEG of quality 95, the data's format) and ``metadata.csv`` with the data
table's columns in its order. A row without a lesion id starts a new lesion (``LF_<image_id>``);
an empty sex or body site is ``unknown``, an empty age missing. An image file whose sha256 differs
from the one its task carried (the queue's tasks do) is refused: the label belongs to another
image. Image ids that do not match the
data's ``validate.image_id_pattern`` (a request id of the inference log, a file name of a folder)
are numbered from ``number_from`` when given (the mapping is returned, and written beside the
batch by the command), and refused otherwise, naming them. Nothing in the data changes here: the
ingest checks the batch and makes the data version.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.core.errors import LesionflowError

_JPEG = (".jpg", ".jpeg")


class LabelImportError(LesionflowError, ValueError):
    """Labelled rows that cannot become a batch; the message names the image."""


@dataclass
class Batch:
    """A batch written for ingest: its image folder, metadata table and the renamed ids."""

    images: Path
    metadata: Path
    renamed: pd.DataFrame


def find_image(folder: Path, image_id: str) -> Path:
    """The file of ``image_id`` in ``folder`` (any extension; a JPEG first)."""
    found = sorted(p for p in folder.glob(f"{glob_escape(image_id)}.*") if p.is_file())
    found.sort(key=lambda p: p.suffix.lower() not in _JPEG)
    if not found:
        raise LabelImportError(f"{image_id}: no image file {image_id}.* in {folder}")
    return found[0]


def glob_escape(text: str) -> str:
    """``text`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _check_digests(rows: pd.DataFrame, sources: dict[str, Path]) -> None:
    """Each image file is the one its task showed (the task's ``sha256``, when it carried one)."""
    import hashlib

    expected = dict(zip(rows["image_id"], rows["sha256"])) if "sha256" in rows else {}
    for image_id, digest in expected.items():
        if isinstance(digest, str) and digest and hashlib.sha256(sources[image_id].read_bytes()).hexdigest() != digest:
            raise LabelImportError(
                f"{image_id}: {sources[image_id]} is not the image that was labelled "
                "(its sha256 differs from the task's)"
            )


def _new_ids(ids: pd.Series, pattern: str, number_from: int | None) -> dict[str, str]:
    bad = [i for i in ids if not re.fullmatch(pattern, i)]
    if bad and number_from is None:
        raise LabelImportError(
            f"{len(bad)} image id(s) do not match the data's image_id_pattern {pattern!r} "
            f"({', '.join(bad[:3])}); give --number-from N to number them ISIC_{{N:07d}}, ISIC_{{N+1:07d}}, ..."
        )
    return {old: f"ISIC_{number_from + k:07d}" for k, old in enumerate(bad)} if bad else {}


def _write_image(src: Path, dest: Path) -> None:
    if src.suffix.lower() in _JPEG:
        shutil.copyfile(src, dest)
        return
    from PIL import Image

    from pipeline.core import images

    rgb = images.decode_rgb(src, str(src))
    Image.fromarray(rgb).save(dest, "JPEG", quality=95)


def make_batch(
    rows: pd.DataFrame, image_dir: Path, dest: Path, columns: list[str], pattern: str, number_from: int | None = None
) -> Batch:
    """The batch of ``rows`` (see the module docstring) in ``dest`` (a new folder)."""
    if dest.exists():
        raise LabelImportError(f"{dest}: already exists (nothing is overwritten)")
    if rows.empty:
        raise LabelImportError("no labelled image to import")
    missing_how = rows.loc[rows["dx_type"].fillna("").astype(str).str.strip() == "", "image_id"].tolist()
    if missing_how:
        raise LabelImportError(f"no dx_type (how the diagnosis was confirmed) for {', '.join(missing_how[:5])}")
    sources = {i: find_image(image_dir, i) for i in rows["image_id"]}
    _check_digests(rows, sources)
    renamed = _new_ids(rows["image_id"], pattern, number_from)
    table = rows.copy()
    table["image_id"] = table["image_id"].map(lambda i: renamed.get(i, i))
    lesion = table["lesion_id"].fillna("").astype(str).str.strip()
    table["lesion_id"] = lesion.where(lesion != "", "LF_" + table["image_id"])
    for col in ("sex", "localization"):
        value = table[col].fillna("").astype(str).str.strip()
        table[col] = value.where(value != "", "unknown")
    table["age"] = pd.to_numeric(table["age"], errors="coerce")
    (dest / "images").mkdir(parents=True)
    for old, src in sources.items():
        _write_image(src, dest / "images" / f"{renamed.get(old, old)}.jpg")
    for col in columns:
        if col not in table:
            table[col] = None
    table[columns].to_csv(dest / "metadata.csv", index=False)
    id_map = pd.DataFrame({"source_id": list(renamed), "image_id": list(renamed.values())})
    return Batch(dest / "images", dest / "metadata.csv", id_map)
