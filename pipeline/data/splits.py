"""The split files (``artifacts/splits/{train,val,test}.csv``): the one reader every stage uses.

A split file holds the metadata rows of its images plus ``split``. :func:`read_split` checks what
every consumer needs (the file exists, has rows and the columns asked for) and names the file when
it does not; :func:`image_files` finds each row's image (any extension of
:data:`pipeline.core.images.IMAGE_EXTENSIONS`) and names the row when one is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.core import images
from pipeline.core.errors import LesionflowError
from pipeline.core.layout import LAYOUT, SPLITS
from pipeline.core.metadata import read_csv

#: Columns every split file has.
REQUIRED = ("image_id", "lesion_id", "dx")


class SplitError(LesionflowError, ValueError):
    """A missing or malformed split file; the message names it."""


def read_split(splits_dir: Path | str, name: str, required: Sequence[str] = REQUIRED) -> pd.DataFrame:
    """The rows of split ``name`` (ids as text, the file's order)."""
    path = LAYOUT.split_file(name, Path(splits_dir))
    if not path.exists():
        raise SplitError(f"{path}: split file not found (run the split stage first: dvc repro split)")
    df = read_csv(path, "split file", dtype={"lesion_id": str, "image_id": str})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SplitError(f"{path}: column(s) {', '.join(missing)} missing (columns: {', '.join(df.columns)})")
    if df.empty:
        raise SplitError(f"{path}: no rows")
    return df.reset_index(drop=True)


def read_splits(splits_dir: Path | str, names: Sequence[str] = SPLITS) -> dict[str, pd.DataFrame]:
    """:func:`read_split` of each name."""
    return {name: read_split(splits_dir, name) for name in names}


def split_table(splits_dir: Path | str, metadata_csv: Path | str | None = None) -> pd.DataFrame:
    """Every split's rows in one table (``split`` column), sorted by image_id. With
    ``metadata_csv``: every image must be listed there."""
    table = pd.concat([read_split(splits_dir, s, (*REQUIRED, "split")) for s in SPLITS], ignore_index=True)
    dup = table["image_id"][table["image_id"].duplicated()]
    if len(dup):
        raise SplitError(f"{splits_dir}: image {dup.iloc[0]} appears in more than one split file")
    if metadata_csv is not None:
        listed = set(read_csv(metadata_csv, "metadata table", usecols=["image_id"], dtype=str)["image_id"])
        unknown = sorted(set(table["image_id"]) - listed)
        if unknown:
            raise SplitError(f"{metadata_csv}: does not list image {unknown[0]} found in the split files")
    return table.sort_values("image_id").reset_index(drop=True)


def image_files(frame: pd.DataFrame, images_dir: Path | str, source: Path | str) -> list[Path]:
    """The image file of every row of ``frame`` (read from ``source``), in order; a missing one
    raises :class:`pipeline.core.images.ImageError` naming the row (counted from 0 after the
    header), the image id and how many are missing."""
    index = images.index_images(images_dir)
    ids = frame["image_id"].astype(str).tolist()
    missing = [i for i, image_id in enumerate(ids) if image_id not in index]
    if missing:
        row = missing[0]
        images.image_file(
            index, ids[row], images_dir, f"{source}: row {row} (image_id {ids[row]}), {len(missing)} missing in all"
        )
    return [index[i] for i in ids]
