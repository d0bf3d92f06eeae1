"""What one data version adds over another: ``lesionflow data diff [REV_A] [REV_B]``.

Files come from ``dvc diff --json`` (DVC compares the two versions of ``data/``; nothing here
re-implements it). The metadata tables of both versions (``dvc.api.read`` at a git revision, the
file itself for the workspace) give the per-class counts before and after, the new lesions and
patients, and how the metadata columns' distributions moved; the split files of both versions
(when their DVC outputs are cached) the per-split counts. The image statistics of the added images
are compared with those of the images that were there before (the ``eda`` stage's table for the
old ones; computed for the new ones) by the monitoring's drift check (Evidently, effect sizes).

``REV_A`` defaults to the git commit the champion was trained on, ``REV_B`` to the workspace.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import fsutil, params
from pipeline.core.errors import LesionflowError
from pipeline.core.layout import SPLITS, Layout
from pipeline.core.reporting import md_table

#: The workspace as a revision.
WORKSPACE = "workspace"
#: Metadata columns whose distribution is compared (those present).
CATEGORICAL = ("dx", "dx_type", "sex", "localization")
#: Most added images whose statistics are computed (a seeded sample beyond that).
MAX_STAT_IMAGES = 2000


class DataDiffError(LesionflowError, RuntimeError):
    """A revision that does not exist or whose data DVC cannot read; the message says which."""


def _rel(layout: Layout, path: Path) -> str:
    return str(path.relative_to(layout.root))


def _read_table(layout: Layout, path: Path, rev: str) -> pd.DataFrame | None:
    """A CSV output at ``rev`` (None when DVC holds no copy of it), or in the workspace."""
    if rev == WORKSPACE:
        return pd.read_csv(path, dtype={"lesion_id": str, "image_id": str}) if path.exists() else None
    import dvc.api

    try:
        text = dvc.api.read(_rel(layout, path), repo=str(layout.root), rev=rev)
    except Exception:  # noqa: BLE001 - not cached, not an output at that rev: reported as unknown
        return None
    return pd.read_csv(io.StringIO(text), dtype={"lesion_id": str, "image_id": str})


def dvc_diff(layout: Layout, rev_a: str, rev_b: str) -> dict[str, list[str]]:
    """``dvc diff --json`` of the data between two revisions: paths added/deleted/modified."""
    from pipeline.data.ingest import IngestError, dvc

    args = ["diff", "--json", "--targets", _rel(layout, layout.data_dir), "--", rev_a]
    try:
        proc = dvc(*args, *([] if rev_b == WORKSPACE else [rev_b]), cwd=layout.root)
    except IngestError as exc:
        raise DataDiffError(f"dvc diff {rev_a} {rev_b}: {exc}") from None
    raw = json.loads(proc.stdout or "{}")
    out = {}
    for kind in ("added", "deleted", "modified", "renamed"):
        entries = raw.get(kind) or []
        paths = [e["path"]["new"] if isinstance(e.get("path"), dict) else e["path"] for e in entries]
        out[kind] = sorted(p for p in paths if not p.endswith(os.sep) and not p.endswith("/"))
    return out


def _counts(df: pd.DataFrame | None, column: str) -> dict[str, int]:
    if df is None or column not in df.columns:
        return {}
    return {str(k): int(v) for k, v in df[column].astype(str).value_counts().sort_index().items()}


def _before_after(a: dict[str, int], b: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"value": k, "before": a.get(k, 0), "after": b.get(k, 0), "change": b.get(k, 0) - a.get(k, 0)}
        for k in sorted(set(a) | set(b))
    ]


def _shares(df: pd.DataFrame | None, column: str) -> dict[str, float]:
    counts = _counts(df, column)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()}


def _split_counts(layout: Layout, rev: str) -> dict[str, int] | None:
    counts = {}
    for name in SPLITS:
        df = _read_table(layout, layout.split_file(name), rev)
        if df is None:
            return None
        counts[name] = len(df)
    return counts


def _image_drift(layout: Layout, added: list[str], old_ids: list[str]) -> dict[str, Any]:
    """Image statistics of the added images against the old ones (monitoring's drift check)."""
    from pipeline.features.batch import compute_features
    from pipeline.features.imagestats import stat_columns
    from pipeline.monitoring.drift import drift_report

    present = [f for f in added if (layout.root / f).exists()]
    if not present:
        return {"checked": False, "reason": "the added images are not in the workspace"}
    eda = layout.eda_dir / "features.parquet"
    if not eda.exists():
        return {"checked": False, "reason": f"no image statistics of the old images ({eda}: run the eda stage)"}
    eda_p = params.load_section("eda", layout.params_file)
    old = pd.read_parquet(eda)
    old = old[old["image_id"].astype(str).isin(set(old_ids))]
    if len(present) > MAX_STAT_IMAGES:
        present = pd.Series(present).sample(MAX_STAT_IMAGES, random_state=0).tolist()
    new = pd.DataFrame(compute_features([layout.root / f for f in present], eda_p.features, progress=False))
    num, _ = stat_columns(eda_p.features)
    num = [c for c in num if c in old.columns and c in new.columns]
    mon = params.load_section("monitor", layout.params_file)
    _, res, share = drift_report(old[num], new[num], num, [], mon, mon.drift_share, html=False)
    drifted = sorted((c for c in num if res.get(c, {}).get("drifted")), key=lambda c: -(res[c].get("effect") or 0))
    return {
        "checked": True,
        "old_images": len(old),
        "added_images": len(new),
        "drift_share": round(share, 4),
        "drifted": [{"feature": c, "effect": res[c].get("effect"), "score": res[c].get("score")} for c in drifted],
        "largest_effects": sorted(
            ({"feature": c, "effect": res[c].get("effect")} for c in num if res.get(c, {}).get("effect") is not None),
            key=lambda r: -r["effect"],
        )[:5],
    }


def diff(layout: Layout, rev_a: str, rev_b: str = WORKSPACE, *, image_stats: bool = True) -> dict[str, Any]:
    """The data-version diff as one JSON-ready dict (see the module docstring)."""
    files = dvc_diff(layout, rev_a, rev_b)
    meta_a = _read_table(layout, layout.metadata_csv, rev_a)
    meta_b = _read_table(layout, layout.metadata_csv, rev_b)
    if meta_a is None or meta_b is None:
        missing = rev_a if meta_a is None else rev_b
        raise DataDiffError(
            f"cannot read {_rel(layout, layout.metadata_csv)} at {missing}: not in the DVC cache "
            "(`lesionflow dvc fetch --all-commits data.dvc` or `dvc pull` at that revision)"
        )
    tax = params.load_taxonomy(layout.params_file)
    pc = params.load_section("split", layout.params_file).patient_column
    for df in (meta_a, meta_b):
        df["risk"] = df["dx"].astype(str).map(tax.mapping("risk"))
    images_a = set(meta_a["image_id"])
    added_ids = sorted(set(meta_b["image_id"]) - images_a)
    report: dict[str, Any] = {
        "rev_a": rev_a,
        "rev_b": rev_b,
        "files": {k: len(v) for k, v in files.items()},
        "images": {
            "before": len(meta_a),
            "after": len(meta_b),
            "added": len(added_ids),
            "removed": len(images_a - set(meta_b["image_id"])),
        },  # fmt: skip
        "dx": _before_after(_counts(meta_a, "dx"), _counts(meta_b, "dx")),
        "risk": _before_after(_counts(meta_a, "risk"), _counts(meta_b, "risk")),
        "splits": {"before": _split_counts(layout, rev_a), "after": _split_counts(layout, rev_b)},
        "new_lesions": sorted(set(meta_b["lesion_id"]) - set(meta_a["lesion_id"])),
        "new_patients": sorted(set(meta_b[pc].astype(str)) - set(meta_a[pc].astype(str)))
        if pc in meta_a.columns and pc in meta_b.columns
        else None,
        "metadata": _metadata_shifts(meta_a, meta_b),
        "age": {
            "before_mean": _mean(meta_a, "age"),
            "after_mean": _mean(meta_b, "age"),
            "added_mean": _mean(meta_b[meta_b["image_id"].isin(added_ids)], "age"),
        },
        "added_files": files["added"][:50],
    }
    if image_stats and rev_b == WORKSPACE and added_ids:
        added_files = [f for f in files["added"] if Path(f).stem in set(added_ids)]
        report["image_statistics"] = _image_drift(layout, added_files, sorted(images_a))
    return report


def _metadata_shifts(meta_a: pd.DataFrame, meta_b: pd.DataFrame) -> dict[str, Any]:
    """Per categorical metadata column: counts before/after and the total variation distance."""
    out = {}
    for col in CATEGORICAL:
        if col not in meta_a.columns or col not in meta_b.columns:
            continue
        a, b = _shares(meta_a, col), _shares(meta_b, col)
        out[col] = {
            "shift_tvd": round(0.5 * sum(abs(a.get(k, 0) - b.get(k, 0)) for k in set(a) | set(b)), 4),
            "counts": _before_after(_counts(meta_a, col), _counts(meta_b, col)),
        }
    return out


def _mean(df: pd.DataFrame, col: str) -> float | None:
    if col not in df.columns or df.empty:
        return None
    v = pd.to_numeric(df[col], errors="coerce").mean()
    return None if pd.isna(v) else round(float(v), 2)


def _change_table(rows: list[dict[str, Any]], what: str) -> str:
    return md_table(
        [(r["value"], r["before"], r["after"], f"{r['change']:+d}") for r in rows],
        [what, "before", "after", "change"],
        align="lrrr",
    )


def render_markdown(d: dict[str, Any]) -> str:
    """The diff as the Markdown a person reads (and the retraining flow's artifact)."""
    im = d["images"]
    lines = [
        f"# Data diff: {d['rev_a']} -> {d['rev_b']}",
        "",
        f"- images: {im['before']:,} -> {im['after']:,} (+{im['added']:,} added, -{im['removed']:,} removed; "
        f"files per `dvc diff`: {d['files']['added']} added, {d['files']['deleted']} deleted, "
        f"{d['files']['modified']} modified)",
        f"- new lesions: {len(d['new_lesions'])}"
        + (f"; new patients: {len(d['new_patients'])}" if d.get("new_patients") is not None else ""),
        "",
        "## Per diagnosis",
        "",
        _change_table(d["dx"], "dx"),
        "",
        "## Per risk class",
        "",
        _change_table(d["risk"], "risk"),
        "",
        "## Per split",
        "",
    ]
    sb, sa = d["splits"]["before"], d["splits"]["after"]
    if sb is None and sa is None:
        lines.append("Split files not available at either revision.")
    else:
        rows = [(s, (sb or {}).get(s, "?"), (sa or {}).get(s, "?")) for s in SPLITS]
        lines.append(md_table(rows, ["split", "before", "after"], align="lrr"))
        if sa is not None and sum(sa.values()) != im["after"]:
            pending = im["after"] - sum(sa.values())
            lines += ["", f"{pending:,} image(s) not in a split yet: the split stage has not run on this version."]
    lines += ["", "## Metadata distributions (total variation distance)", ""]
    lines.append(md_table([(c, f"{v['shift_tvd']:.3f}") for c, v in d["metadata"].items()],
                          ["column", "shift"], align="lr"))  # fmt: skip
    age = d["age"]
    lines += ["", f"Mean age: {age['before_mean']} -> {age['after_mean']} (added images: {age['added_mean']})."]
    st = d.get("image_statistics")
    if st:
        lines += ["", "## Image statistics of the added images against the old ones", ""]
        if not st["checked"]:
            lines.append(f"Not checked: {st['reason']}.")
        else:
            drifted = ", ".join(f"{r['feature']} ({r['effect']:.2f} sd)" for r in st["drifted"]) or "none"
            lines.append(
                f"{st['added_images']:,} added vs {st['old_images']:,} old images: drift share "
                f"{st['drift_share']:.2f}; drifted: {drifted}."
            )
    return "\n".join(lines) + "\n"


def write(d: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``data_diff.json`` and ``data_diff.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fsutil.write_json(out_dir / "data_diff.json", d)
    fsutil.atomic_write_text(out_dir / "data_diff.md", render_markdown(d))
    return out_dir / "data_diff.json", out_dir / "data_diff.md"
