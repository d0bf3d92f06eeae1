"""The metadata of an image beyond its pixels: the one list of fields and the one reader of a
user's metadata table.

:data:`FIELDS` (age, sex, localization) are what a fusion model uses, the service accepts per
request, the inference log keeps and monitoring compares; their vocabularies are the ``metadata``
section of params.yaml (stored in every model's config). :func:`read_metadata_csv` reads the table
a user gives with a folder of images (``lesionflow monitor --metadata``, external validation).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from pipeline.core.errors import LesionflowError

#: The metadata fields of an image, in order.
FIELDS: tuple[str, ...] = ("age", "sex", "localization")


class MetadataError(LesionflowError, ValueError):
    """A bad metadata table; the message names the file, row and field."""


def read_csv(path: Path | str, what: str = "table", **options: Any) -> pd.DataFrame:
    """The one reader of a CSV file a user gives (``pandas.read_csv(path, **options)``), or a
    :class:`MetadataError` naming the file and what is wrong with it: missing, a folder, empty, not
    UTF-8 text (a UTF-16 export, a binary file), not a table."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise MetadataError(f"{path}: {what} not found")
    if not path.is_file():
        raise MetadataError(f"{path}: {what} is a folder, not a CSV file")
    try:
        return pd.read_csv(path, **options)
    except pd.errors.EmptyDataError:
        raise MetadataError(f"{path}: {what} is empty (no header row)") from None
    except UnicodeDecodeError:
        raise MetadataError(f"{path}: {what} is not UTF-8 text (save it as CSV UTF-8)") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MetadataError(f"{path}: {what} cannot be read as a CSV table ({first})") from None


def read_metadata_csv(path: Path | str, taxonomy: Any = None) -> pd.DataFrame:
    """A metadata table for a folder of images: ``image_id`` (the file stem) plus any of
    :data:`FIELDS` and ``dx`` (labels, checked against ``taxonomy`` when given). Rows are numbered
    as in a spreadsheet (the header is row 1)."""
    import pandas as pd

    path = Path(path)
    df = read_csv(path, "metadata table", dtype={"image_id": str})
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
