"""The data contract's verdict for people: the report of the validate stage, the captions of its
contact sheet of near-duplicates, and the failures as a terminal or a log shows them
(:mod:`pipeline.data.contract` decides; this module words it)."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.reporting import md_table
from pipeline.data.contract import NEAR_SHEET, Check, ValidationResult, read_metadata_table


def render_markdown(result: ValidationResult, metadata_csv: Path, images_dir: Path) -> str:
    """The report a person reads: every check, the failures with their examples, the duplicates."""
    lines = [
        f"# Data validation: {'PASSED' if result.passed else 'FAILED'}",
        "",
        f"- metadata: `{metadata_csv}` ({result.n_rows:,} rows)",
        f"- images: `{images_dir}` ({result.n_files:,} files)",
        f"- checks: {len(result.checks)} run, {len(result.failed)} failed ({result.seconds:.1f} s)",
        "",
        md_table(
            [(c.description, c.kind, _verdict(c), c.failures) for c in result.checks],
            ["check", "kind", "result", "failures"],
            align="lllr",
        ),
    ]
    if result.failed or result.warnings:
        lines += ["", "## Failures and warnings", ""]
        for c in result.failed + result.warnings:
            lines += [f"### {c.description}", *(f"- {e}" for e in c.examples), ""]
    lines += ["", "## Byte-identical images", ""]
    if result.duplicate_groups:
        lines += [f"- {', '.join(g)}" for g in result.duplicate_groups]
        lines += ["", "Duplicates inside one lesion are allowed; the split keeps each group in one split."]
    else:
        lines.append("None.")
    lines += ["", "## Near-duplicates", ""]
    if result.near_pairs:
        lines += [
            md_table(
                [(q.a, q.b, f"{q.detail:.2f}") for q in result.near_pairs[:50]],
                ["image", "copy of", "detail similarity"],
                align="llr",
            ),
            "",
            f"{len(result.near_pairs)} pair(s); side by side in `{NEAR_SHEET}`. "
            "The split keeps each group in one split.",
        ]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def _verdict(c: Check) -> str:
    if c.kind == "warning":
        return "**WARN**"
    return "pass" if c.passed else "**FAIL**"


def captions(result: ValidationResult, metadata_csv: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``image_id lesion_id dx`` and the lesion of every image in a near-duplicate pair, for the
    contact sheet."""
    ids = {x for q in result.near_pairs for x in (q.a, q.b)}
    df = read_metadata_table(metadata_csv)
    df = df[df["image_id"].astype(str).isin(ids)]
    return (
        {str(r.image_id): f"{r.image_id} {r.lesion_id} {r.dx}" for r in df.itertuples()},
        {str(r.image_id): str(r.lesion_id) for r in df.itertuples()},
    )


def format_failures(result: ValidationResult) -> str:
    """The failed checks with their examples, for a terminal or a log."""
    out = [f"Data contract violated: {len(result.failed)} of {len(result.checks)} checks failed"]
    for c in result.failed:
        out.append(f"  FAILED: {c.description} [{c.name}] - {c.failures} failure(s)")
        out += [f"      {e}" for e in c.examples]
    return "\n".join(out)
