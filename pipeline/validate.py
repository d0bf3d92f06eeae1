"""Stage ``validate``: the data contract.

Two halves, one verdict:

1. a Great Expectations (1.x) expectation suite over the metadata table: required columns and
   types; ``dx``, ``dx_type``, ``sex`` and ``localization`` within their vocabularies; ``age`` null
   or within ``age_min..age_max``; ``image_id`` unique and matching ``image_id_pattern``;
   ``lesion_id`` present; every lesion carries exactly one diagnosis;
2. file checks that GE cannot do alone: every ``image_id`` has a file that decodes (fully) as an
   RGB image of at least ``min_width`` x ``min_height``; no orphan image files; byte-identical
   images are reported, and a byte-identical pair spanning two lesions is a violation.

Outputs: ``reports/validation/summary.json`` (machine-readable, a DVC metric),
``reports/validation/report.md`` (for people) and ``artifacts/validation/images.csv`` (one row per
image: file, md5, format, size; the split stage uses the md5 to keep duplicates together).
On any violation the stage writes the reports, prints every failed check with example rows or
files, and exits with status 1, so that nothing downstream runs.

Run: ``python -m pipeline.validate [--metadata CSV] [--images DIR] [--params params.yaml]``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from tqdm.auto import tqdm

from pipeline import fsutil, images, lineage, params
from pipeline.core import project

log = logging.getLogger("lesionflow.validate")

METADATA = Path("data/HAM10000_metadata.csv")
IMAGES = Path("data/images")
REPORT_DIR = Path("reports/validation")
INDEX_CSV = Path("artifacts/validation/images.csv")


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
    checks: list[Check]
    n_rows: int
    n_files: int
    duplicate_groups: list[list[str]]
    index: pd.DataFrame
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "rows": self.n_rows,
            "image_files": self.n_files,
            "checks_total": len(self.checks),
            "checks_failed": len(self.failed),
            "duplicate_groups": len(self.duplicate_groups),
            "duplicates": self.duplicate_groups,
            "seconds": round(self.seconds, 2),
            "checks": [asdict(c) for c in self.checks],
        }


# ----------------------------------------------------------------------------------------------
# metadata contract (Great Expectations)


def _row_label(df: pd.DataFrame, idx: Any) -> str:
    """'row N (image_id X)' with N the 1-based data row of the CSV (header excluded)."""
    label = f"row {int(idx) + 1}"
    if "image_id" in df.columns:
        label += f" (image_id {df.at[idx, 'image_id']})"
    return label


def build_suite(p: params.ValidateParams, dx_vocab: Iterable[str], columns: Iterable[str]):
    """The expectation suite for the columns present in the table."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    present = set(columns)
    suite = gx.ExpectationSuite(name="ham10000_metadata_contract")
    for col in p.required_columns:
        suite.add_expectation(gxe.ExpectColumnToExist(column=col))
    add = lambda col, exp: col in present and suite.add_expectation(exp)  # noqa: E731
    for col in ("lesion_id", "image_id", "dx"):
        add(col, gxe.ExpectColumnValuesToNotBeNull(column=col))
    add("image_id", gxe.ExpectColumnValuesToBeUnique(column="image_id"))
    add("image_id", gxe.ExpectColumnValuesToMatchRegex(column="image_id", regex=p.image_id_pattern))
    add("dx", gxe.ExpectColumnValuesToBeInSet(column="dx", value_set=list(dx_vocab)))
    add("dx_type", gxe.ExpectColumnValuesToBeInSet(column="dx_type", value_set=p.dx_types))
    add("sex", gxe.ExpectColumnValuesToBeInSet(column="sex", value_set=p.sexes))
    if p.localizations:
        add("localization", gxe.ExpectColumnValuesToBeInSet(column="localization", value_set=p.localizations))
    add("_age_is_number", gxe.ExpectColumnValuesToBeInSet(column="_age_is_number", value_set=[True]))
    add("age", gxe.ExpectColumnValuesToBeBetween(column="age", min_value=p.age_min, max_value=p.age_max))
    add(
        "_dx_per_lesion",
        gxe.ExpectColumnValuesToBeBetween(column="_dx_per_lesion", min_value=1, max_value=1),
    )
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
        "expect_column_values_to_be_between": f"{col} is empty or within {kwargs.get('min_value')}..{kwargs.get('max_value')}",
    }
    return texts.get(exp_type, f"{exp_type}({col})")


def check_metadata(df: pd.DataFrame, p: params.ValidateParams, dx_vocab: Iterable[str]) -> list[Check]:
    """Run the Great Expectations suite over ``df``; one :class:`Check` per expectation."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    shown = df.reset_index(drop=True)  # values as the user wrote them, for messages
    df = shown.copy()
    if "age" in df.columns:
        number = pd.to_numeric(df["age"], errors="coerce")
        df["_age_is_number"] = df["age"].isna() | number.notna()
        df["age"] = number
    if "lesion_id" in df.columns and "dx" in df.columns:
        df["_dx_per_lesion"] = df.groupby("lesion_id", dropna=False)["dx"].transform("nunique")
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("metadata")
        .add_dataframe_asset("ham10000")
        .add_batch_definition_whole_dataframe("all_rows")
        .get_batch(batch_parameters={"dataframe": df})
    )
    suite = build_suite(p, dx_vocab, df.columns)
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    checks = []
    for r in result.results:
        cfg = r.expectation_config
        kwargs = dict(cfg.kwargs)
        res = r.result or {}
        examples: list[str] = []
        failures = int(res.get("unexpected_count") or 0)
        col = kwargs.get("column")
        for idx in (res.get("unexpected_index_list") or [])[: p.max_examples]:
            shown_col = "age" if col == "_age_is_number" else col
            value = shown.at[idx, shown_col] if shown_col in shown.columns else None
            value = value.item() if hasattr(value, "item") else value  # numpy scalar -> plain repr
            if col == "_dx_per_lesion":
                lesion = df.at[idx, "lesion_id"]
                dxs = sorted(df.loc[df["lesion_id"] == lesion, "dx"].astype(str).unique())
                examples.append(f"{_row_label(df, idx)}: lesion {lesion} has diagnoses {dxs}")
            else:
                examples.append(f"{_row_label(df, idx)}: {shown_col}={value!r}")
        if cfg.type == "expect_column_to_exist" and not r.success:
            examples.append(f"columns present: {[c for c in df.columns if not c.startswith('_')]}")
            failures = 1
        exc = r.exception_info or {}
        if exc.get("raised_exception"):
            examples.append(f"check raised: {exc.get('exception_message')}")
        checks.append(
            Check(
                name=f"{cfg.type}({col})" if col else cfg.type,
                description=_describe(cfg.type, kwargs),
                passed=bool(r.success),
                failures=failures if not r.success else 0,
                examples=examples if not r.success else [],
            )
        )
    return checks


# ----------------------------------------------------------------------------------------------
# file checks


def _inspect(job: tuple[str, int, int, bool]) -> dict[str, Any]:
    """Read one file once: md5 of its bytes, then a full decode. Runs in a worker process."""
    path, min_w, min_h, require_rgb = job
    row: dict[str, Any] = {"file": path, "md5": None, "format": None, "mode": None, "width": None, "height": None, "error": None}
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
        if w < min_w or h < min_h:
            row["error"] = f"too small: {w}x{h}, the minimum is {min_w}x{min_h}"
    except images.ImageError as exc:
        row["error"] = exc.reason
    return row


def inspect_files(paths: list[Path], p: params.ValidateParams) -> pd.DataFrame:
    """Hash and fully decode every file, in parallel over the cores, with a progress bar."""
    jobs = [(str(f), p.min_width, p.min_height, p.require_rgb) for f in paths]
    workers = p.workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 200:
        rows = [_inspect(j) for j in tqdm(jobs, desc="validate files", unit="img", disable=None)]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(
                tqdm(pool.map(_inspect, jobs, chunksize=64), total=len(jobs), desc="validate files", unit="img", disable=None)
            )
    return pd.DataFrame(rows, columns=["file", "md5", "format", "mode", "width", "height", "error"])


def check_files(df: pd.DataFrame, images_dir: Path, p: params.ValidateParams) -> tuple[list[Check], pd.DataFrame, list[list[str]]]:
    """File checks; returns the checks, the per-image index and the byte-identical groups."""
    n = p.max_examples
    exts = {e.lower() for e in p.image_extensions}
    on_disk = {
        f.stem: f for f in sorted(images_dir.iterdir())
        if f.is_file() and not f.name.startswith(".")
    } if images_dir.is_dir() else {}
    ids = [str(i) for i in df["image_id"].dropna().astype(str)] if "image_id" in df.columns else []
    id_set = set(ids)

    def file_for(image_id: str) -> Path | None:
        f = on_disk.get(image_id)
        return f if f is not None and f.suffix.lower() in exts else None

    files = [(i, file_for(i)) for i in ids]
    missing = [i for i, f in files if f is None]
    orphans = [f.name for stem, f in on_disk.items() if stem not in id_set]
    present = [f for _, f in files if f is not None]
    index = inspect_files(present, p)
    index.insert(0, "image_id", [f.stem for f in present])
    bad = index[index["error"].notna()]

    checks = [
        Check("image_files_exist", f"every image_id has a file {'/'.join(sorted(exts))} in {images_dir}",
              not missing, len(missing), [f"image_id {i}: no file {images_dir}/{i}{sorted(exts)[0]}" for i in missing[:n]], "file"),
        Check("images_decode", f"every image decodes fully as {'RGB' if p.require_rgb else 'an'} image of at least {p.min_width}x{p.min_height}",
              bad.empty, len(bad), [f"{r.file}: {r.error}" for r in bad.head(n).itertuples()], "file"),
        Check("no_orphan_files", f"every file in {images_dir} belongs to a metadata row",
              not orphans, len(orphans), [f"{images_dir}/{o}: not referenced by any image_id" for o in orphans[:n]], "file"),
    ]

    groups: list[list[str]] = []
    spanning: list[str] = []
    lesion_of = dict(zip(df["image_id"].astype(str), df["lesion_id"])) if "lesion_id" in df.columns else {}
    hashed = index.dropna(subset=["md5"])
    for _, grp in hashed[hashed.duplicated("md5", keep=False)].groupby("md5", sort=True):
        members = sorted(grp["image_id"])
        groups.append(members)
        lesions = sorted({str(lesion_of.get(m)) for m in members})
        if len(lesions) > 1:
            spanning.append(f"{', '.join(members)} are byte-identical but belong to lesions {lesions}")
    checks.append(Check("duplicates_within_one_lesion", "byte-identical images never span two lesions",
                        not spanning, len(spanning), spanning[:n], "file"))
    first_of = {m: g[0] for g in groups for m in g[1:]}
    index["duplicate_of"] = index["image_id"].map(first_of)
    return checks, index, groups


# ----------------------------------------------------------------------------------------------
# the stage


def validate(metadata_csv: Path, images_dir: Path, p: params.ValidateParams, dx_vocab: Iterable[str]) -> ValidationResult:
    """Check the metadata table and the image folder against the contract."""
    t0 = time.perf_counter()
    if not metadata_csv.exists():
        raise FileNotFoundError(f"{metadata_csv}: metadata table not found (run `dvc pull`)")
    try:
        df = pd.read_csv(metadata_csv, dtype={"lesion_id": str, "image_id": str})
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{metadata_csv}: not a readable CSV table: {exc}") from exc
    checks = check_metadata(df, p, dx_vocab)
    if "image_id" in df.columns:
        file_checks, index, groups = check_files(df, images_dir, p)
        checks += file_checks
    else:
        index, groups = pd.DataFrame(columns=["image_id", "file", "md5"]), []
    n_files = sum(1 for f in images_dir.iterdir() if f.is_file()) if images_dir.is_dir() else 0
    return ValidationResult(checks, len(df), n_files, groups, index, time.perf_counter() - t0)


def render_markdown(result: ValidationResult, metadata_csv: Path, images_dir: Path) -> str:
    status = "PASSED" if result.passed else "FAILED"
    lines = [
        f"# Data validation: {status}",
        "",
        f"- metadata: `{metadata_csv}` ({result.n_rows:,} rows)",
        f"- images: `{images_dir}` ({result.n_files:,} files)",
        f"- checks: {len(result.checks)} run, {len(result.failed)} failed ({result.seconds:.1f} s)",
        "",
        "| check | kind | result | failures |",
        "|---|---|---|---:|",
    ]
    for c in result.checks:
        lines.append(f"| {c.description} | {c.kind} | {'pass' if c.passed else '**FAIL**'} | {c.failures} |")
    if result.failed:
        lines += ["", "## Failures", ""]
        for c in result.failed:
            lines.append(f"### {c.description}")
            lines += [f"- {e}" for e in c.examples]
            lines.append("")
    lines += ["", "## Byte-identical images", ""]
    if result.duplicate_groups:
        lines += [f"- {', '.join(g)}" for g in result.duplicate_groups]
        lines.append("")
        lines.append("Duplicates inside one lesion are allowed; the split keeps each group in one split.")
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def write_outputs(result: ValidationResult, metadata_csv: Path, images_dir: Path,
                  report_dir: Path = REPORT_DIR, index_csv: Path = INDEX_CSV,
                  run_params: dict | None = None) -> None:
    summary = result.summary()
    summary["lineage"] = lineage.lineage(params=run_params or {}, files=[metadata_csv] if metadata_csv.exists() else [])
    fsutil.write_json(report_dir / "summary.json", summary)
    fsutil.atomic_write_text(report_dir / "report.md", render_markdown(result, metadata_csv, images_dir))
    if result.passed:
        index_csv.parent.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write_text(index_csv, result.index.to_csv(index=False))


def format_failures(result: ValidationResult) -> str:
    out = [f"Data contract violated: {len(result.failed)} of {len(result.checks)} checks failed"]
    for c in result.failed:
        out.append(f"  FAILED: {c.description} [{c.name}] - {c.failures} failure(s)")
        out += [f"      {e}" for e in c.examples]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    project.enter()  # paths are relative to the project root, from any subfolder
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadata", type=Path, default=METADATA)
    ap.add_argument("--images", type=Path, default=IMAGES)
    ap.add_argument("--params", type=Path, default=params.DEFAULT_PARAMS)
    ap.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    ap.add_argument("--index", type=Path, default=INDEX_CSV)
    args = ap.parse_args(argv)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    try:
        p = params.load_section("validate", args.params)
        tax = params.load_taxonomy(args.params)
        result = validate(args.metadata, args.images, p, tax.diagnoses)
    except (params.ParamsError, FileNotFoundError, ValueError) as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 2
    write_outputs(result, args.metadata, args.images, args.report_dir, args.index,
                  {"validate": params.to_dict(p), "labels": tax.to_dict()})
    if not result.passed:
        print(format_failures(result), file=sys.stderr)
        print(f"Reports: {args.report_dir}/report.md, {args.report_dir}/summary.json", file=sys.stderr)
        return 1
    print(f"Data contract passed: {result.n_rows:,} rows, {len(result.index):,} images, "
          f"{len(result.checks)} checks, {len(result.duplicate_groups)} byte-identical group(s) "
          f"within single lesions ({result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
