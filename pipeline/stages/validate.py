"""Stage ``validate``: the data contract (:mod:`pipeline.data.contract`) over the data version.

    python -m pipeline.stages.validate [--metadata CSV] [--images DIR] [--index CSV] [--reports DIR]

Writes ``reports/validation/``: ``summary.json`` (numbers: the DVC metrics), ``checks.json`` (every
check with its example rows or files, the byte-identical groups), ``lineage.json`` and
``report.md`` (with ``near_duplicates.png``, the near-duplicate pairs side by side, when there
are any); and, only when the contract holds, ``artifacts/validation/images.csv`` (one row per
image: file, md5, format, size, ``near_group``; the split stage keeps byte-identical and near-duplicate groups
together). On a violation
it prints every failed check with examples and exits 1, so nothing downstream runs.
"""

from __future__ import annotations

import logging
import sys
from argparse import Namespace
from pathlib import Path

from pipeline.core import fsutil, lineage, params, stagecli
from pipeline.core.errors import EXIT_FAILED, EXIT_OK
from pipeline.data import contract, contract_report, neardup


def write_outputs(result: contract.ValidationResult, args: Namespace, lin: dict) -> None:
    """The reports (always) and the image index (only when the contract holds)."""
    reports = args.reports
    fsutil.write_json(reports / "summary.json", result.metrics(), sort_keys=False)
    fsutil.write_json(reports / "checks.json", result.details())
    fsutil.write_json(reports / "lineage.json", lin)
    fsutil.atomic_write_text(reports / "report.md", contract_report.render_markdown(result, args.metadata, args.images))
    sheet = reports / contract.NEAR_SHEET
    if result.near_pairs:
        captions, lesion_of = contract_report.captions(result, args.metadata)
        across_first = sorted(result.near_pairs, key=lambda q: lesion_of.get(q.a) == lesion_of.get(q.b))
        neardup.contact_sheet(across_first, dict(zip(result.index["image_id"], result.index["file"])), sheet, captions)
    elif sheet.exists():
        sheet.unlink()
    if result.passed:
        fsutil.atomic_write_text(args.index, result.index.to_csv(index=False))


def body(args: Namespace) -> int:
    """Check the data, write the verdict, exit 1 on a violation."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    p = params.load_section("validate", args.params)
    meta = params.load_section("metadata", args.params)
    tax = params.load_taxonomy(args.params)
    result = contract.validate(args.metadata, args.images, p, meta, tax.diagnoses, progress=not args.no_progress)
    lin = lineage.lineage(
        params={"validate": params.to_dict(p), "metadata": params.to_dict(meta), "labels": tax.to_dict()},
        files=[args.metadata] if Path(args.metadata).exists() else [],
    )
    write_outputs(result, args, lin)
    if not result.passed:
        print(contract_report.format_failures(result), file=sys.stderr)
        print(f"Reports: {args.reports / 'report.md'}, {args.reports / 'checks.json'}", file=sys.stderr)
        return EXIT_FAILED
    for c in result.warnings:
        print(f"WARNING: {c.description}: {c.failures} pair(s), e.g.", *c.examples, sep="\n  ", file=sys.stderr)
    print(
        f"Data contract passed: {result.n_rows:,} rows, {len(result.index):,} images, {len(result.checks)} "
        f"checks, {len(result.duplicate_groups)} byte-identical group(s) within single lesions, "
        f"{len(result.near_pairs)} near-duplicate pair(s) ({result.seconds:.1f} s)"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return stagecli.run("validate", __doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
