"""The data contract: what the metadata table and the image folder must satisfy.

Two halves, one verdict (:func:`validate`):

1. a Great Expectations (1.x) expectation suite over the metadata table (:func:`check_metadata`):
   required columns; ``dx`` in the taxonomy; ``dx_type``, ``sex`` and ``localization`` within the
   ``metadata`` vocabularies; ``age`` a number (or empty) within ``age_min..age_max``;
   ``image_id`` unique and matching ``image_id_pattern``; ``lesion_id`` present; every lesion
   carries exactly one diagnosis;
2. file checks that GE cannot do alone (:func:`check_files`): every ``image_id`` has a file (an
   allowed extension) that decodes fully as an RGB image of at least ``min_width`` x
   ``min_height`` and at most ``max_aspect_ratio`` elongated; no orphan files; byte-identical
   images are reported, and a byte-identical pair spanning two lesions is a violation; copies of
   one image that are not byte-identical (:mod:`pipeline.data.neardup`) spanning two lesions are a
   warning, or a violation with ``validate.near_duplicates: error``.

Every failed check carries example rows or files as the user would find them (rows numbered from
1 after the header). The ``validate`` stage writes the verdict; new data is checked by the same
functions before it is added.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import images, params
from pipeline.core.errors import LesionflowError
from pipeline.core.formats import SizeLimits
from pipeline.core.metadata import read_csv
from pipeline.core.workers import map_chunks
from pipeline.data import neardup

#: The validation report's PNG of near-duplicate pairs (next to report.md).
NEAR_SHEET = "near_duplicates.png"
INDEX_COLUMNS = ["image_id", "file", "md5", "format", "mode", "width", "height", "error"]


class ContractError(LesionflowError, ValueError):
    """Input the contract cannot even be checked on (no metadata table, not a CSV)."""


@dataclass
class Check:
    """One check of the contract and its outcome."""

    name: str
    description: str
    passed: bool
    failures: int = 0
    examples: list[str] = field(default_factory=list)
    kind: str = "expectation"  # "expectation" (Great Expectations) or "file"


@dataclass
class ValidationResult:
    """The verdict: every check, the image index and the byte-identical groups."""

    checks: list[Check]
    n_rows: int
    n_files: int
    duplicate_groups: list[list[str]]
    index: pd.DataFrame
    seconds: float = 0.0
    near_pairs: list[neardup.Pair] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.kind == "warning"]

    def metrics(self) -> dict[str, Any]:
        """The DVC metrics: whether the contract passed and how many checks failed."""
        return {
            "checks_failed": len(self.failed),
            "near_duplicate_pairs": len(self.near_pairs),
            "passed": int(self.passed),
        }

    def details(self) -> dict[str, Any]:
        """Every check with its examples, the counts and the duplicate groups."""
        return {
            "passed": self.passed,
            "rows": self.n_rows,
            "image_files": self.n_files,
            "checks": [asdict(c) for c in self.checks],
            "duplicates": self.duplicate_groups,
            "near_duplicates": [asdict(p) for p in self.near_pairs],
            "seconds": round(self.seconds, 2),
        }


# ----------------------------------------------------------------------------------------------
# metadata contract (Great Expectations)


def _row_label(df: pd.DataFrame, idx: Any) -> str:
    """'row N (image_id X)' with N the 1-based data row of the CSV (header excluded)."""
    label = f"row {int(idx) + 1}"
    if "image_id" in df.columns:
        label += f" (image_id {df.at[idx, 'image_id']})"
    return label


def build_suite(p: params.ValidateParams, meta: params.MetadataParams, dx_vocab: Iterable[str], columns: Iterable[str]):
    """The expectation suite for the columns present in the table."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    present = set(columns)
    suite = gx.ExpectationSuite(name="ham10000_metadata_contract")
    for col in p.required_columns:
        suite.add_expectation(gxe.ExpectColumnToExist(column=col))

    def add(col: str, expectation: Any) -> None:
        if col in present:
            suite.add_expectation(expectation)

    for col in ("lesion_id", "image_id", "dx"):
        add(col, gxe.ExpectColumnValuesToNotBeNull(column=col))
    add("image_id", gxe.ExpectColumnValuesToBeUnique(column="image_id"))
    add("image_id", gxe.ExpectColumnValuesToMatchRegex(column="image_id", regex=p.image_id_pattern))
    add("dx", gxe.ExpectColumnValuesToBeInSet(column="dx", value_set=list(dx_vocab)))
    for col, vocab in (("dx_type", meta.dx_types), ("sex", meta.sexes), ("localization", meta.localizations)):
        add(col, gxe.ExpectColumnValuesToBeInSet(column=col, value_set=list(vocab)))
    add("_age_is_number", gxe.ExpectColumnValuesToBeInSet(column="_age_is_number", value_set=[True]))
    add("age", gxe.ExpectColumnValuesToBeBetween(column="age", min_value=meta.age_min, max_value=meta.age_max))
    add("_dx_per_lesion", gxe.ExpectColumnValuesToBeBetween(column="_dx_per_lesion", min_value=1, max_value=1))
    return suite


def _describe(exp_type: str, kwargs: dict) -> str:
    col = kwargs.get("column")
    if col == "_dx_per_lesion":
        return "every lesion_id has exactly one diagnosis (dx)"
    if col == "_age_is_number":
        return "age is a number or empty"
    texts = {
        "expect_column_to_exist": f"column {col!r} exists",
        "expect_column_values_to_not_be_null": f"{col} is never empty",
        "expect_column_values_to_be_unique": f"{col} is unique",
        "expect_column_values_to_match_regex": f"{col} matches {kwargs.get('regex')!r}",
        "expect_column_values_to_be_in_set": f"{col} is one of {kwargs.get('value_set')}",
        "expect_column_values_to_be_in_type_list": f"{col} is numeric",
        "expect_column_values_to_be_between": (
            f"{col} is empty or within {kwargs.get('min_value')}..{kwargs.get('max_value')}"
        ),
    }
    return texts.get(exp_type, f"{exp_type}({col})")


def _with_derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The table plus what the suite checks but the CSV does not hold: whether ``age`` parses as a
    number (then ``age`` as numbers) and the number of diagnoses of each row's lesion."""
    df = df.copy()
    if "age" in df.columns:
        number = pd.to_numeric(df["age"], errors="coerce")
        df["_age_is_number"] = df["age"].isna() | number.notna()
        df["age"] = number
    if "lesion_id" in df.columns and "dx" in df.columns:
        df["_dx_per_lesion"] = df.groupby("lesion_id", dropna=False)["dx"].transform("nunique")
    return df


def _run_suite(df: pd.DataFrame, p: params.ValidateParams, meta: params.MetadataParams, dx_vocab: Iterable[str]) -> Any:
    """Great Expectations 1.x on a pandas frame: an ephemeral context (created before the suite, as
    GE requires), quiet."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("metadata")
        .add_dataframe_asset("ham10000")
        .add_batch_definition_whole_dataframe("all_rows")
        .get_batch(batch_parameters={"dataframe": df})
    )
    return batch.validate(build_suite(p, meta, dx_vocab, df.columns), result_format={"result_format": "COMPLETE"})


def _examples(r: Any, shown: pd.DataFrame, df: pd.DataFrame, max_examples: int) -> tuple[int, list[str]]:
    """(failure count, example rows as the user wrote them) of one expectation result."""
    cfg, res = r.expectation_config, r.result or {}
    col = cfg.kwargs.get("column")
    failures = int(res.get("unexpected_count") or 0)
    examples: list[str] = []
    for idx in (res.get("unexpected_index_list") or [])[:max_examples]:
        if col == "_dx_per_lesion":
            lesion = df.at[idx, "lesion_id"]
            dxs = sorted(df.loc[df["lesion_id"] == lesion, "dx"].astype(str).unique())
            examples.append(f"{_row_label(df, idx)}: lesion {lesion} has diagnoses {dxs}")
            continue
        shown_col = "age" if col == "_age_is_number" else col
        value = shown.at[idx, shown_col] if shown_col in shown.columns else None
        value = value.item() if hasattr(value, "item") else value  # numpy scalar -> plain repr
        examples.append(f"{_row_label(df, idx)}: {shown_col}={value!r}")
    if cfg.type == "expect_column_to_exist" and not r.success:
        examples.append(f"columns present: {[c for c in df.columns if not c.startswith('_')]}")
        failures = 1
    exc = r.exception_info or {}
    if exc.get("raised_exception"):
        examples.append(f"check raised: {exc.get('exception_message')}")
    return failures, examples


def check_metadata(
    df: pd.DataFrame, p: params.ValidateParams, meta: params.MetadataParams, dx_vocab: Iterable[str]
) -> list[Check]:
    """Run the Great Expectations suite over ``df``; one :class:`Check` per expectation."""
    shown = df.reset_index(drop=True)  # values as the user wrote them, for messages
    derived = _with_derived_columns(shown)
    result = _run_suite(derived, p, meta, dx_vocab)
    checks = []
    for r in result.results:
        cfg = r.expectation_config
        col = cfg.kwargs.get("column")
        failures, examples = _examples(r, shown, derived, p.max_examples)
        checks.append(
            Check(
                name=f"{cfg.type}({col})" if col else cfg.type,
                description=_describe(cfg.type, dict(cfg.kwargs)),
                passed=bool(r.success),
                failures=failures if not r.success else 0,
                examples=examples if not r.success else [],
            )
        )
    return checks


# ----------------------------------------------------------------------------------------------
# file checks


def inspect_file(path: str, limits: SizeLimits, require_rgb: bool) -> dict[str, Any]:
    """Read one file once: md5 of its bytes, a full decode (and the size limits), and the
    near-duplicate thumbnail of a good image (key ``thumb``)."""
    row: dict[str, Any] = {
        "file": path,
        "md5": None,
        "format": None,
        "mode": None,
        "width": None,
        "height": None,
        "error": None,
    }
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        row["error"] = f"cannot be read: {exc}"
        return row
    row["md5"] = hashlib.md5(data).hexdigest()
    try:
        fmt, mode, w, h = images.probe(data, path)
        row.update(format=fmt, mode=mode, width=w, height=h)
        images.decode_rgb(data, path, require_rgb=require_rgb)
        row["error"] = limits.problem(w, h)
        if row["error"] is None:
            row["thumb"] = neardup.file_thumbnail(data)
    except images.ImageError as exc:
        row["error"] = exc.reason
    return row


def _inspect_chunk(paths: list[str], limits: SizeLimits, require_rgb: bool) -> list[dict[str, Any]]:
    return [inspect_file(f, limits, require_rgb) for f in paths]


def inspect_files(
    paths: list[Path], p: params.ValidateParams, progress: bool = True
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Hash and fully decode every file, in parallel over the cores, with a progress bar; the
    per-file index and the near-duplicate thumbnails of the good images (by file)."""
    fn = partial(_inspect_chunk, limits=p.size_limits(), require_rgb=p.require_rgb)
    rows = map_chunks(
        fn, [str(f) for f in paths], chunk_size=64, workers=p.workers, progress=progress, desc="validate files"
    )
    thumbs = {r["file"]: r.pop("thumb") for r in rows if "thumb" in r}
    return pd.DataFrame(rows, columns=INDEX_COLUMNS[1:]), thumbs


def near_duplicates(
    index: pd.DataFrame, thumbs: dict[str, np.ndarray], lesion_of: dict[str, Any], p: params.ValidateParams
) -> tuple[list[neardup.Pair], list[str]]:
    """Near-duplicate pairs among the indexed images (``validate.near_duplicates`` not off), and
    a message per pair spanning two lesions."""
    if p.near_duplicates == "off" or not thumbs:
        return [], []
    good = index[index["file"].isin(thumbs)]
    stack = np.stack([thumbs[f] for f in good["file"]])
    pairs = neardup.find_pairs(stack, list(good["image_id"]), min_detail=p.near_duplicate_min_detail)
    spanning = [
        f"{q.a} (lesion {lesion_of.get(q.a)}) and {q.b} (lesion {lesion_of.get(q.b)}) are copies of one image "
        f"(detail similarity {q.detail:.2f})"
        for q in pairs
        if lesion_of.get(q.a) != lesion_of.get(q.b)
    ]
    return pairs, spanning


def duplicate_groups(index: pd.DataFrame, lesion_of: dict[str, Any]) -> tuple[list[list[str]], list[str]]:
    """Groups of byte-identical images (by md5, sorted), and a message per group spanning lesions."""
    groups: list[list[str]] = []
    spanning: list[str] = []
    hashed = index.dropna(subset=["md5"])
    for _, grp in hashed[hashed.duplicated("md5", keep=False)].groupby("md5", sort=True):
        members = sorted(grp["image_id"])
        groups.append(members)
        lesions = sorted({str(lesion_of.get(m)) for m in members})
        if len(lesions) > 1:
            spanning.append(f"{', '.join(members)} are byte-identical but belong to lesions {lesions}")
    return groups, spanning


def _file_check(name: str, description: str, failures: list[str], max_examples: int) -> Check:
    return Check(name, description, not failures, len(failures), failures[:max_examples], "file")


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")]


def _presence_checks(
    ids: list[str],
    found: dict[str, Path],
    index: pd.DataFrame,
    images_dir: Path,
    p: params.ValidateParams,
    allowed: tuple,
) -> list[Check]:
    """Every image_id has a file, every file decodes within the size limits, no file is an orphan."""
    kind = "RGB" if p.require_rgb else "an"
    id_set = set(ids)
    return [
        _file_check(
            "image_files_exist",
            f"every image_id has a file {'/'.join(allowed)} in {images_dir}",
            [f"image_id {i}: no file {images_dir}/{i}{allowed[0]}" for i in ids if i not in found],
            p.max_examples,
        ),
        _file_check(
            "images_decode",
            f"every image decodes fully as {kind} image of at least {p.min_width}x{p.min_height}, "
            f"aspect ratio at most {p.max_aspect_ratio:g}:1",
            [f"{r.file}: {r.error}" for r in index[index["error"].notna()].itertuples()],
            p.max_examples,
        ),
        _file_check(
            "no_orphan_files",
            f"every file in {images_dir} belongs to a metadata row",
            [
                f"{images_dir}/{f.name}: not referenced by any image_id"
                for f in _visible_files(images_dir)
                if f.stem not in id_set
            ],
            p.max_examples,
        ),
    ]


def _near_check(near_spanning: list[str], p: params.ValidateParams) -> list[Check]:
    """Copies across lesions: a warning or a violation (``validate.near_duplicates``), or no check."""
    if p.near_duplicates == "off":
        return []
    near = _file_check(
        "near_duplicates_within_one_lesion",
        "no copy of an image (resized, re-compressed, slightly cropped, colour-shifted) spans two lesions",
        near_spanning,
        p.max_examples,
    )
    if p.near_duplicates == "warn" and near_spanning:
        near.passed, near.kind = True, "warning"
    return [near]


def check_files(
    df: pd.DataFrame, images_dir: Path, p: params.ValidateParams, progress: bool = True
) -> tuple[list[Check], pd.DataFrame, list[list[str]], list[neardup.Pair]]:
    """File checks; returns the checks, the per-image index (with ``duplicate_of`` and
    ``near_group``), the byte-identical groups and the near-duplicate pairs."""
    allowed = tuple(e.lower() for e in p.image_extensions)
    found = images.index_images(images_dir, allowed)
    ids = [str(i) for i in df["image_id"].dropna().astype(str)] if "image_id" in df.columns else []
    present = [found[i] for i in ids if i in found]
    index, thumbs = inspect_files(present, p, progress)
    index.insert(0, "image_id", [f.stem for f in present])
    lesion_of = dict(zip(df["image_id"].astype(str), df["lesion_id"])) if "lesion_id" in df.columns else {}
    groups, spanning = duplicate_groups(index, lesion_of)
    index["duplicate_of"] = index["image_id"].map({m: g[0] for g in groups for m in g[1:]})
    near_pairs, near_spanning = near_duplicates(index, thumbs, lesion_of, p)
    index["near_group"] = index["image_id"].map(neardup.groups(near_pairs))
    checks = _presence_checks(ids, found, index, images_dir, p, allowed) + [
        _file_check(
            "duplicates_within_one_lesion", "byte-identical images never span two lesions", spanning, p.max_examples
        ),
        *_near_check(near_spanning, p),
    ]
    return checks, index, groups, near_pairs


# ----------------------------------------------------------------------------------------------
# the verdict


def read_metadata_table(metadata_csv: Path) -> pd.DataFrame:
    """The metadata table as text ids; :class:`ContractError` when it is missing or not a CSV."""
    if not metadata_csv.exists():
        raise ContractError(f"{metadata_csv}: metadata table not found (run `dvc pull`)")
    return read_csv(metadata_csv, "metadata table", dtype={"lesion_id": str, "image_id": str})


def validate(
    metadata_csv: Path,
    images_dir: Path,
    p: params.ValidateParams,
    meta: params.MetadataParams,
    dx_vocab: Iterable[str],
    progress: bool = True,
) -> ValidationResult:
    """Check the metadata table and the image folder against the contract."""
    t0 = time.perf_counter()
    df = read_metadata_table(metadata_csv)
    checks = check_metadata(df, p, meta, dx_vocab)
    if "image_id" in df.columns:
        file_checks, index, groups, near = check_files(df, images_dir, p, progress)
        checks += file_checks
    else:
        index, groups, near = pd.DataFrame(columns=["image_id", "file", "md5"]), [], []
    n_files = sum(1 for f in images_dir.iterdir() if f.is_file()) if images_dir.is_dir() else 0
    return ValidationResult(checks, len(df), n_files, groups, index, time.perf_counter() - t0, near)
