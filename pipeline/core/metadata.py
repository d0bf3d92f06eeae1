"""The metadata of an image beyond its pixels: the one list of fields and the one reader of a
user's metadata table.

:data:`FIELDS` (age, sex, localization) are what a fusion model uses, the service accepts per
request, the inference log keeps and monitoring compares; their vocabularies are the ``metadata``
section of params.yaml (stored in every model's config). :func:`read_metadata_csv` reads the table
a user gives with a folder of images (``lesionflow monitor --metadata``, external validation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.errors import LesionflowError

#: The metadata fields of an image, in order.
FIELDS: tuple[str, ...] = ("age", "sex", "localization")


class MetadataError(LesionflowError, ValueError):
    """A bad metadata table; the message names the file, row and field."""


def read_metadata_csv(path: Path | str, taxonomy: Any = None) -> pd.DataFrame:
    """A metadata table for a folder of images: ``image_id`` (the file stem) plus any of
    :data:`FIELDS` and ``dx`` (labels, checked against ``taxonomy`` when given). Rows are numbered
    as in a spreadsheet (the header is row 1)."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"image_id": str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: cannot be read as CSV ({exc})") from None
    if "image_id" not in df:
        raise MetadataError(f"{path}: no 'image_id' column (columns: {', '.join(map(str, df.columns))})")
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise MetadataError(f"{path}: image_id {dup.iloc[0]!r} appears more than once")
    if "age" in df:
        age = pd.to_numeric(df["age"], errors="coerce")
        bad = df.index[age.isna() & df["age"].notna()]
        if len(bad):
            raise MetadataError(f"{path}: row {bad[0] + 2}: field 'age' is not a number: {df['age'][bad[0]]!r}")
        df["age"] = age
    if "dx" in df and taxonomy is not None:
        known = set(taxonomy.classes("dx"))
        bad = df.index[df["dx"].notna() & ~df["dx"].isin(known)]
        if len(bad):
            raise MetadataError(
                f"{path}: row {bad[0] + 2}: field 'dx' has unknown diagnosis {df['dx'][bad[0]]!r} "
                f"(known: {', '.join(sorted(known))})"
            )
    return df
