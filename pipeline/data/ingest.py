"""Ingest: a batch of new labelled images becomes a new DVC data version, or nothing changes.

:func:`check_batch` runs the data contract on the batch itself (:func:`pipeline.data.contract.validate`:
the same checks the ``validate`` stage runs, with the batch's own row numbers and files) and then
what only a batch can break, against the current data:

* an ``image_id`` that already exists;
* a ``lesion_id`` that exists with another diagnosis (a lesion keeps its diagnosis), or with
  another patient (``split.patient_column``, when either table has it);
* columns other than the current table's;
* a byte-identical copy of an existing image, or a near-duplicate (:mod:`pipeline.data.neardup`)
  of one under another lesion (allowed with ``allow_near_duplicates``: the split keeps them
  together).

:func:`apply` merges a checked batch into ``data/`` (images copied, rows appended) and runs
``dvc add data``; any failure halfway (including Ctrl-C) puts ``data/`` and ``data.dvc`` back
byte for byte. :func:`commit` and :func:`push` record the new version in git and the DVC remote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import images, lineage, params
from pipeline.core.errors import LesionflowError
from pipeline.core.layout import Layout
from pipeline.core.workers import map_chunks
from pipeline.data import contract, contract_report, neardup


class IngestError(LesionflowError, RuntimeError):
    """The batch was refused, or merging it failed (and was undone); the message says which."""


@dataclass
class BatchCheck:
    """The verdict on a batch: the contract on the batch itself plus the checks against the data."""

    batch_csv: Path
    batch: contract.ValidationResult
    against_data: list[contract.Check]
    rows: pd.DataFrame
    files: dict[str, Path]
    seconds: float = 0.0
    near_pairs: list[neardup.Pair] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.batch.passed and all(c.passed for c in self.against_data)

    def failures(self) -> str:
        """Every failed check with its examples, for a terminal or a log."""
        lines = []
        if not self.batch.passed:
            lines.append(contract_report.format_failures(self.batch))
        bad = [c for c in self.against_data if not c.passed]
        if bad:
            lines.append(f"Against the current data: {len(bad)} of {len(self.against_data)} checks failed")
            for c in bad:
                lines.append(f"  FAILED: {c.description} [{c.name}] - {c.failures} failure(s)")
                lines += [f"      {e}" for e in c.examples]
        return "\n".join(lines)


def _row(i: int) -> str:
    return f"row {i + 2}"  # numbered as a user sees the file: the header is line 1


def _md5_chunk(paths: list[str]) -> list[str]:
    return [lineage.file_md5(p) for p in paths]


def _thumb_chunk(paths: list[str]) -> list[np.ndarray]:
    return [neardup.file_thumbnail(p) for p in paths]


def _check(name: str, description: str, failures: list[str], max_examples: int) -> contract.Check:
    return contract.Check(name, description, not failures, len(failures), failures[:max_examples], "batch")


def _table_problems(rows: pd.DataFrame, current: pd.DataFrame, batch_csv: Path, current_csv: Path, pc: str) -> dict:
    """Columns, ids, and lesions keeping their diagnosis and patient: messages naming the rows."""
    lesions = current.drop_duplicates("lesion_id").set_index("lesion_id")
    lesion_dx = lesions["dx"].astype(str).to_dict()
    cur_row = {str(v): k for k, v in enumerate(current["image_id"].astype(str))}
    out = {
        "columns": [f"{batch_csv}: column {c!r} is not in {current_csv}" for c in rows.columns if c not in current]
        + [f"{batch_csv}: has no column {c!r} (the current table has it)" for c in current.columns if c not in rows],
        "ids": [
            f"{batch_csv} {_row(k)}: image_id {iid} already exists ({current_csv} {_row(cur_row[iid])})"
            for k, iid in enumerate(rows["image_id"].astype(str))
            if iid in cur_row
        ],
        "dx": [
            f"{batch_csv} {_row(k)}: lesion {lid} is {lesion_dx[lid]} in the current data, {dx} here"
            for k, (lid, dx) in enumerate(zip(rows["lesion_id"], rows["dx"].astype(str)))
            if lid in lesion_dx and lesion_dx[lid] != dx
        ],
        "patient": [],
    }
    if pc in rows.columns and pc in current.columns:
        patient = lesions[pc].astype(str).to_dict()
        out["patient"] = [
            f"{batch_csv} {_row(k)}: lesion {lid} belongs to patient {patient[lid]} in the current data, {pat} here"
            for k, (lid, pat) in enumerate(zip(rows["lesion_id"], rows[pc].astype(str)))
            if lid in patient and patient[lid] != pat
        ]
    return out


def _copy_problems(
    files: dict[str, Path],
    batch_md5: dict[str, str],
    existing: dict[str, Path],
    lesion_of: dict[str, str],
    min_detail: float,
    progress: bool,
) -> tuple[list[str], list[str], list[neardup.Pair]]:
    """Batch images byte-identical to existing ones, and near-duplicates of existing images of
    another lesion (messages naming both files), with every near-duplicate pair."""
    old_ids = [i for i in existing if i in lesion_of]
    old_paths = [str(existing[i]) for i in old_ids]
    old_md5 = dict(zip(map_chunks(_md5_chunk, old_paths, chunk_size=256, progress=progress, desc="hash data"), old_ids))
    identical = [
        f"{files[i]}: byte-identical to {existing[old_md5[m]]} (image_id {old_md5[m]})"
        for i, m in batch_md5.items()
        if m in old_md5
    ]
    old_thumbs = np.stack(map_chunks(_thumb_chunk, old_paths, chunk_size=256, progress=progress, desc="thumbnails"))
    new_ids = list(batch_md5)
    new_thumbs = np.stack(_thumb_chunk([str(files[i]) for i in new_ids]))
    pairs = neardup.find_pairs(new_thumbs, new_ids, reference=old_thumbs, reference_ids=old_ids, min_detail=min_detail)
    near = [
        f"{files[q.a]} (lesion {lesion_of[q.a]}) is a copy of {existing[q.b]} (lesion {lesion_of[q.b]}; "
        f"detail similarity {q.detail:.2f})"
        for q in pairs
        if lesion_of[q.a] != lesion_of[q.b]
    ]
    return identical, near, pairs


def check_batch(
    batch_csv: Path,
    batch_dir: Path,
    layout: Layout,
    *,
    allow_near_duplicates: bool = False,
    progress: bool = True,
) -> BatchCheck:
    """The batch against the contract and against the current data (see the module docstring)."""
    t0 = time.perf_counter()
    batch_csv, pfile = Path(batch_csv), layout.params_file
    p = params.load_section("validate", pfile)
    pc = params.load_section("split", pfile).patient_column
    result = contract.validate(
        batch_csv, Path(batch_dir), p, params.load_section("metadata", pfile),
        params.load_taxonomy(pfile).diagnoses, progress=progress,
    )  # fmt: skip
    rows = contract.read_metadata_table(batch_csv)
    if not result.passed:
        return BatchCheck(batch_csv, result, [], rows, {}, time.perf_counter() - t0)
    current = contract.read_metadata_table(layout.metadata_csv)
    allowed = tuple(e.lower() for e in p.image_extensions)
    found = images.index_images(batch_dir, allowed)
    files = {i: found[i] for i in rows["image_id"].astype(str)}
    lesion_of = {
        **dict(zip(current["image_id"].astype(str), current["lesion_id"])),
        **dict(zip(rows["image_id"].astype(str), rows["lesion_id"])),
    }
    table = _table_problems(rows, current, batch_csv, layout.metadata_csv, pc)
    identical, near_problems, pairs = _copy_problems(
        files, dict(zip(result.index["image_id"], result.index["md5"])),
        images.index_images(layout.images_dir, allowed), lesion_of, p.near_duplicate_min_detail, progress,
    )  # fmt: skip
    mx = p.max_examples
    checks = [
        _check("same_columns", "the batch has the current table's columns", table["columns"], mx),
        _check("new_image_ids", "every image_id is new", table["ids"], mx),
        _check("lesions_keep_their_diagnosis", "a lesion that exists keeps its diagnosis", table["dx"], mx),
        _check("lesions_keep_their_patient", f"a lesion that exists keeps its {pc}", table["patient"], mx),
        _check("no_copies_of_existing_images", "no image is byte-identical to an existing one", identical, mx),
        _check(
            "no_near_duplicates_across_lesions",
            "no image is a near-duplicate of an existing image of another lesion",
            near_problems,
            mx,
        ),
    ]
    if allow_near_duplicates and near_problems:
        checks[-1].passed, checks[-1].kind = True, "warning"
    return BatchCheck(batch_csv, result, checks, rows, files, time.perf_counter() - t0, pairs)


# ----------------------------------------------------------------------------------------------
# merging


def _run(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise IngestError(f"{what} failed ({' '.join(cmd)}, exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``dvc ARGS`` with this interpreter's DVC, in ``cwd``; :class:`IngestError` when it fails."""
    return _run([sys.executable, "-m", "dvc", *args], cwd, f"dvc {args[0]}")


def apply(checked: BatchCheck, layout: Layout) -> dict[str, str]:
    """Merge a passed batch into the data and run ``dvc add``; returns the data version before and
    after (``{"before": md5, "after": md5}``). Undone completely on any failure."""
    if not checked.passed:
        raise IngestError("the batch did not pass its checks; nothing was changed")
    pointer, meta_csv, images_dir = layout.data_pointer, layout.metadata_csv, layout.images_dir
    saved_pointer = pointer.read_bytes() if pointer.exists() else None
    saved_meta = meta_csv.read_bytes()
    before = lineage.data_version(pointer).get("md5", "unknown")
    taken = sorted(src.name for src in checked.files.values() if (images_dir / src.name).exists())
    if taken:  # a file that exists is never replaced, and so never removed by the rollback below
        raise IngestError(
            f"{images_dir / taken[0]}: a file of that name exists in the data (not listed in its metadata "
            f"table); {len(taken)} such name(s); nothing was changed"
        )
    created: list[Path] = []
    try:
        for src in checked.files.values():
            dest = images_dir / src.name
            tmp = dest.with_name(f".{dest.name}.ingest")
            shutil.copyfile(src, tmp)
            os.link(tmp, dest)  # fails if a file of that name appeared meanwhile: never replaced
            created.append(dest)
            tmp.unlink()
        # the current rows stay byte for byte; the batch's follow in the current column order
        columns = pd.read_csv(meta_csv, nrows=0).columns
        batch = pd.read_csv(checked.batch_csv, dtype=str, keep_default_na=False)[list(columns)]
        head = saved_meta if saved_meta.endswith(b"\n") else saved_meta + b"\n"
        tmp_meta = meta_csv.with_name(f".{meta_csv.name}.ingest")
        tmp_meta.write_bytes(head + batch.to_csv(index=False, header=False, lineterminator="\n").encode())
        os.replace(tmp_meta, meta_csv)
        dvc("add", "-q", str(layout.data_dir.relative_to(layout.root)), cwd=layout.root)
    except BaseException:
        for f in created:  # only the files this ingest made
            f.unlink(missing_ok=True)
        for src in checked.files.values():
            (images_dir / f".{src.name}.ingest").unlink(missing_ok=True)
        meta_csv.write_bytes(saved_meta)
        if saved_pointer is not None:
            pointer.write_bytes(saved_pointer)
        raise
    return {"before": before, "after": lineage.data_version(pointer).get("md5", "unknown")}


def commit(layout: Layout, message: str) -> str:
    """``git commit`` of the data pointer alone (nothing else staged is included); the commit id."""
    rel = str(layout.data_pointer.relative_to(layout.root))
    _run(["git", "add", "--", rel], layout.root, "git add")
    _run(["git", "commit", "-q", "-m", message, "--", rel], layout.root, "git commit")
    return _run(["git", "rev-parse", "HEAD"], layout.root, "git rev-parse").stdout.strip()


def push(layout: Layout) -> None:
    """``dvc push`` of the data version to the default remote."""
    dvc("push", "-q", str(layout.data_pointer.relative_to(layout.root)), cwd=layout.root)
