"""A datasheet of the data version a model learned from, computed from that version's own files.

The metadata CSV of the data version, the validate stage's image index (byte-identical copies and
near-duplicate groups) and the split stage's files are read from the DVC cache by the md5s the
model recorded (:mod:`pipeline.audit.versioned`), so the sheet describes what the model saw, not
what the workspace holds today. The split's independence is checked here again, from the files:
no lesion, no byte-identical copy and no near-duplicate group in two splits.

    sheet = datasheet(VersionedFiles(root), record)    # record: the model's lesionflow.json
    markdown(sheet)
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd

from pipeline.audit.versioned import VersionedFiles, stage_output
from pipeline.core.layout import SPLITS, Layout
from pipeline.core.reporting import frame_table
from pipeline.model.retrieval import ATTRIBUTION, CONFIRMATION

LICENCE = {
    "name": "CC BY-NC-SA 4.0",
    "url": "https://creativecommons.org/licenses/by-nc-sa/4.0/",
    "terms": "attribution, non-commercial, share-alike: models trained on it inherit the non-commercial term",
    "citation": "Tschandl P., Rosendahl C., Kittler H. The HAM10000 dataset, a large collection of multi-source "
    "dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018), "
    "doi:10.1038/sdata.2018.161; Harvard Dataverse doi:10.7910/DVN/DBW86T",
    "attribution": ATTRIBUTION,
}


def _csv(data: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(data), dtype={"lesion_id": str, "image_id": str})


def _counts(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in series.fillna("missing").value_counts().sort_index().items()}


def demographics(meta: pd.DataFrame) -> dict[str, Any]:
    """Counts per diagnosis, confirmation type (and both), sex, body site; age quartiles and decades."""
    age = pd.to_numeric(meta["age"], errors="coerce")
    known = age[age > 0]
    decades = (known // 10 * 10).astype(int).astype(str) + "s"
    return {
        "images": len(meta),
        "lesions": int(meta["lesion_id"].nunique()),
        "diagnosis": _counts(meta["dx"]),
        "confirmation": {f"{k} ({CONFIRMATION.get(k, k)})": v for k, v in _counts(meta["dx_type"]).items()},
        "diagnosis_by_confirmation": {
            str(dx): {str(t): int(n) for t, n in row.items() if n}
            for dx, row in pd.crosstab(meta["dx"], meta["dx_type"]).iterrows()
        },
        "sex": _counts(meta["sex"]),
        "localization": _counts(meta["localization"]),
        "age": {
            "missing_or_zero": int(len(age) - len(known)),
            "quartiles": [float(q) for q in known.quantile([0.25, 0.5, 0.75])] if len(known) else None,
            "by_decade": _counts(decades),
        },
    }


def split_independence(frames: dict[str, pd.DataFrame], index: pd.DataFrame | None) -> dict[str, Any]:
    """Sizes and diagnoses per split, and how many lesions, byte-identical copies and near-duplicate
    groups appear in more than one split (each must be 0)."""
    where = pd.concat([f.assign(split=name) for name, f in frames.items()], ignore_index=True)
    out: dict[str, Any] = {
        "sizes": {n: len(f) for n, f in frames.items()},
        "diagnosis": {n: _counts(f["dx"]) for n, f in frames.items()},
        "lesions_in_two_splits": int((where.groupby("lesion_id")["split"].nunique() > 1).sum()),
    }
    if index is not None:
        idx = index.set_index("image_id")
        joined = where.join(idx[["md5", "near_group"]], on="image_id")
        out["identical_files_in_two_splits"] = int((joined.groupby("md5")["split"].nunique() > 1).sum())
        grouped = joined.dropna(subset=["near_group"])
        out["near_duplicate_groups_in_two_splits"] = int((grouped.groupby("near_group")["split"].nunique() > 1).sum())
    return out


def datasheet(cache: VersionedFiles, record: dict[str, Any]) -> dict[str, Any]:
    """The datasheet of the data version in ``record`` (a model's ``lesionflow.json``)."""
    layout = Layout(cache.root)
    data = record.get("data") or {}
    meta_rel = layout.metadata_csv.relative_to(layout.data_dir).as_posix()
    meta = _csv(cache.read_in(data.get("md5", ""), meta_rel, "the data version"))
    sheet: dict[str, Any] = {
        "data_version": {k: data.get(k) for k in ("md5", "nfiles", "size", "source")},
        "licence": LICENCE,
        **demographics(meta),
    }
    lock = record.get("dvc_lock") or {}
    rel = lambda p: p.relative_to(layout.root).as_posix()  # noqa: E731
    index_md5 = stage_output(lock, "validate", rel(layout.validation_index))
    index = _csv(cache.read(index_md5, "the validate stage's image index")) if index_md5 else None
    if index is not None:
        sheet["duplicates"] = {
            "byte_identical_copies": int(index["duplicate_of"].notna().sum()),
            "near_duplicate_groups": int(index["near_group"].nunique()),
            "images_in_near_duplicate_groups": int(index["near_group"].notna().sum()),
        }
    splits_md5 = stage_output(lock, "split", rel(layout.splits_dir))
    if splits_md5:
        frames = {s: _csv(cache.read_in(splits_md5, f"{s}.csv", "the split")) for s in SPLITS}
        sheet["split"] = {
            "grouping": "connected groups of one lesion, one patient (when the metadata has a patient column; "
            "HAM10000's has none), byte-identical files and near-duplicates, each group in one split, "
            "stratified by diagnosis (pipeline/data/splitting.py)",
            **split_independence(frames, index),
        }
    return sheet


def markdown(sheet: dict[str, Any]) -> str:
    """The datasheet as Markdown."""
    v, lic = sheet["data_version"], sheet["licence"]
    lines = [
        "# Datasheet of the data version",
        "",
        f"- data version: md5 `{v['md5']}` ({v.get('nfiles')} files, {v.get('size')} bytes, from `{v.get('source')}`)",
        f"- images: {sheet['images']:,}; lesions: {sheet['lesions']:,}",
        f"- licence: **{lic['name']}** ({lic['terms']}); {lic['url']}",
        f"- cite: {lic['citation']}",
        "",
    ]
    tables = {
        "Diagnosis": sheet["diagnosis"],
        "How the diagnosis was confirmed": sheet["confirmation"],
        "Sex": sheet["sex"],
        "Body site": sheet["localization"],
        "Age by decade (missing or 0 left out)": sheet["age"]["by_decade"],
    }
    for title, counts in tables.items():
        frame = pd.DataFrame({"value": list(counts), "images": list(counts.values())})
        lines += [f"## {title}", "", frame_table(frame), ""]
    cross = pd.DataFrame(sheet["diagnosis_by_confirmation"]).T.fillna(0).astype(int)
    lines += ["## Diagnosis by confirmation", "", frame_table(cross.reset_index(names="dx")), ""]
    lines += [f"Age missing or 0: {sheet['age']['missing_or_zero']}; quartiles {sheet['age']['quartiles']}.", ""]
    if "duplicates" in sheet:
        d = sheet["duplicates"]
        lines += [
            "## Duplicates",
            "",
            f"Byte-identical copies: {d['byte_identical_copies']}; near-duplicate groups: "
            f"{d['near_duplicate_groups']} ({d['images_in_near_duplicate_groups']} images).",
            "",
        ]
    if "split" in sheet:
        s = sheet["split"]
        lines += ["## Split", "", f"Grouped {s['grouping']}. Sizes: {s['sizes']}.", ""]
        for key in ("lesions_in_two_splits", "identical_files_in_two_splits", "near_duplicate_groups_in_two_splits"):
            if key in s:
                lines.append(f"- {key.replace('_', ' ')}: **{s[key]}** (checked again from the split files)")
        lines.append("")
    return "\n".join(lines)
