"""Stage ``split``: a leakage-free train/val/test split.

Images are grouped so that nothing the model could memorise crosses a split boundary: all
images of one lesion (``group_column``), of one patient (``patient_column``, when the metadata
has it) and every set of byte-identical files (from the validation index) form one connected
group, and a group lands in exactly one split. Within that constraint the split is stratified by
diagnosis: groups are placed, largest first, into the split whose quota for their diagnoses is
least filled. Same inputs + same seed = byte-identical outputs.

Outputs: ``artifacts/splits/{train,val,test}.csv`` (the metadata columns plus ``split``, sorted
by ``image_id``), ``reports/split/`` with per-split, per-class counts (CSV, Markdown, PNG) and
``summary.json`` (a DVC metric).

Run: ``python -m pipeline.split [--metadata CSV] [--index CSV] [--params params.yaml]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline import fsutil, lineage, params
from pipeline.core import project

METADATA = Path("data/HAM10000_metadata.csv")
INDEX_CSV = Path("artifacts/validation/images.csv")
OUT_DIR = Path("artifacts/splits")
REPORT_DIR = Path("reports/split")
SPLITS = ("train", "val", "test")


def connected_groups(df: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """Label each row with its connected component: rows sharing a value in any of ``keys``
    (missing values never link rows) end up in the same component."""
    n = len(df)
    rows, cols = [np.arange(n)], [np.arange(n)]
    for key in keys:
        codes, _ = pd.factorize(df[key], use_na_sentinel=True)
        valid = codes >= 0
        idx = np.flatnonzero(valid)
        order = idx[np.argsort(codes[valid], kind="stable")]
        same = codes[order][1:] == codes[order][:-1]
        rows.append(order[:-1][same])
        cols.append(order[1:][same])
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def assign_groups(groups: np.ndarray, strata: np.ndarray, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """Assign every group to one split (index into ``fractions``), stratified by ``strata``.

    Greedy: groups in order of decreasing size (ties broken by a seeded shuffle) go to the split
    whose per-class quota, weighted by the group's own class mix, is least filled.
    """
    group_codes, group_index = np.unique(groups, return_inverse=True)
    class_codes, class_index = np.unique(strata, return_inverse=True)
    n_groups, n_classes = len(group_codes), len(class_codes)
    counts = np.zeros((n_groups, n_classes))
    np.add.at(counts, (group_index, class_index), 1)
    target = np.outer(np.asarray(fractions), counts.sum(axis=0))  # (splits, classes)
    filled = np.zeros_like(target)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(n_groups), -counts.sum(axis=1)))
    assignment = np.empty(n_groups, dtype=np.int64)
    for g in order:
        mix = counts[g]
        # relative shortfall after placing this group, per split (lower = more room left)
        fill = ((filled + mix) / np.maximum(target, 1e-9) * mix).sum(axis=1) / mix.sum()
        s = int(np.argmin(fill))
        assignment[g] = s
        filled[s] += mix
    return assignment[group_index]


def make_split(meta: pd.DataFrame, index: pd.DataFrame, p: params.SplitParams) -> pd.DataFrame:
    """The metadata with a ``split`` column, sorted by ``image_id``."""
    # a canonical row order, so that the result does not depend on how the CSV was sorted
    df = meta.sort_values("image_id", kind="stable").reset_index(drop=True) if "image_id" in meta.columns else meta.copy()
    for col in ("image_id", p.group_column, p.stratify_column):
        if col not in df.columns:
            raise ValueError(f"metadata has no column {col!r} (columns: {list(df.columns)})")
    md5 = index.set_index("image_id")["md5"] if "md5" in index.columns else pd.Series(dtype=str)
    missing = sorted(set(df["image_id"]) - set(md5.index))
    if missing:
        raise ValueError(
            f"validation index has no entry for {len(missing)} image(s), e.g. {missing[:3]}: "
            "re-run the validate stage on this data"
        )
    df["_md5"] = df["image_id"].map(md5)
    keys = [p.group_column, "_md5"] + ([p.patient_column] if p.patient_column in df.columns else [])
    df["_group"] = connected_groups(df, keys)
    fractions = (p.train_fraction, p.val_fraction, p.test_fraction)
    df["split"] = np.asarray(SPLITS)[assign_groups(df["_group"].to_numpy(), df[p.stratify_column].astype(str).to_numpy(), fractions, p.seed)]
    spans = df.groupby("_group")["split"].nunique()
    if (spans > 1).any():  # cannot happen by construction; a guard against future edits
        raise AssertionError(f"{int((spans > 1).sum())} group(s) span two splits")
    return df.drop(columns=["_md5", "_group"]).sort_values("image_id", kind="stable").reset_index(drop=True)


def split_counts(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per-class counts by split, with totals."""
    table = pd.crosstab(df[column], df["split"]).reindex(columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table


def summarise(df: pd.DataFrame, p: params.SplitParams) -> dict[str, Any]:
    counts = split_counts(df, p.stratify_column)
    total = counts.loc["total", "total"]
    fractions = dict(zip(SPLITS, (p.train_fraction, p.val_fraction, p.test_fraction)))
    per_class = counts.drop(index="total")
    shares = per_class[list(SPLITS)].div(per_class["total"], axis=0)
    deviation = (shares - pd.Series(fractions)).abs()
    groups_per_split = df.groupby("split")[p.group_column].nunique()
    return {
        "images": int(total),
        "lesions": int(df[p.group_column].nunique()),
        "sizes": {s: int(counts.loc["total", s]) for s in SPLITS},
        "fractions": {s: round(counts.loc["total", s] / total, 4) for s in SPLITS},
        "lesions_per_split": {s: int(groups_per_split.get(s, 0)) for s in SPLITS},
        "max_class_share_deviation": round(float(deviation.to_numpy().max()), 4),
        "lesions_spanning_splits": int((df.groupby(p.group_column)["split"].nunique() > 1).sum()),
    }


def plot_counts(counts: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_class = counts.drop(index="total")[list(SPLITS)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(per_class))
    width = 0.27
    for i, split in enumerate(SPLITS):
        bars = axes[0].bar(x + (i - 1) * width, per_class[split], width, label=split)
        axes[0].bar_label(bars, fontsize=7, padding=1)
    axes[0].set_xticks(x, per_class.index)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("images (log scale)")
    axes[0].set_title("Images per diagnosis and split")
    axes[0].legend()
    shares = per_class.div(per_class.sum(axis=1), axis=0)
    bottom = np.zeros(len(shares))
    for split in SPLITS:
        axes[1].bar(x, shares[split], bottom=bottom, label=split)
        bottom += shares[split].to_numpy()
    axes[1].set_xticks(x, shares.index)
    axes[1].set_ylim(0, 1)
    axes[1].set_ylabel("share of the diagnosis' images")
    axes[1].set_title("Each diagnosis is split in the same proportions")
    axes[1].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_markdown(counts: pd.DataFrame, summary: dict[str, Any], p: params.SplitParams) -> str:
    lines = [
        "# Train / validation / test split",
        "",
        f"Grouped by `{p.group_column}`"
        + (f" and `{p.patient_column}`" if summary.get("patient_grouping") else "")
        + f" and by byte-identical files, stratified by `{p.stratify_column}`, seed {p.seed}.",
        "",
        f"- images: {summary['images']:,}; lesions: {summary['lesions']:,}",
        "- sizes: " + ", ".join(f"{s} {summary['sizes'][s]:,} ({summary['fractions'][s]:.1%})" for s in SPLITS),
        f"- largest deviation of a class's share from its target: {summary['max_class_share_deviation']:.2%}",
        f"- lesions spanning two splits: {summary['lesions_spanning_splits']}",
        "",
        "| class | " + " | ".join(counts.columns) + " |",
        "|---|" + "---:|" * len(counts.columns),
    ]
    for cls, row in counts.iterrows():
        lines.append(f"| {cls} | " + " | ".join(f"{int(v):,}" for v in row) + " |")
    lines += ["", "![split counts](split_counts.png)", ""]
    return "\n".join(lines)


def write_outputs(df: pd.DataFrame, p: params.SplitParams, out_dir: Path, report_dir: Path, meta_path: Path) -> dict[str, Any]:
    with fsutil.staged_dir(out_dir) as stage:
        for split in SPLITS:
            df[df["split"] == split].to_csv(stage / f"{split}.csv", index=False)
    counts = split_counts(df, p.stratify_column)
    summary = summarise(df, p)
    summary["patient_grouping"] = p.patient_column in df.columns
    report_dir.mkdir(parents=True, exist_ok=True)
    fsutil.atomic_write_text(report_dir / "counts.csv", counts.rename_axis("class").to_csv())
    fsutil.atomic_write_text(report_dir / "report.md", render_markdown(counts, summary, p))
    plot_counts(counts, report_dir / "split_counts.png", f"Split of {summary['images']:,} images (seed {p.seed})")
    summary["lineage"] = lineage.lineage(
        params={"split": params.to_dict(p)}, files=[meta_path] + [out_dir / f"{s}.csv" for s in SPLITS]
    )
    fsutil.write_json(report_dir / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    project.enter()  # paths are relative to the project root, from any subfolder
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--metadata", type=Path, default=METADATA)
    ap.add_argument("--index", type=Path, default=INDEX_CSV, help="the validate stage's image index")
    ap.add_argument("--params", type=Path, default=params.DEFAULT_PARAMS)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    args = ap.parse_args(argv)
    try:
        p = params.load_section("split", args.params)
        if not args.index.exists():
            raise FileNotFoundError(f"{args.index}: validation index not found: run the validate stage first")
        meta = pd.read_csv(args.metadata, dtype={"lesion_id": str, "image_id": str})
        index = pd.read_csv(args.index, dtype={"image_id": str, "md5": str})
        df = make_split(meta, index, p)
    except (params.ParamsError, FileNotFoundError, ValueError) as exc:
        print(f"split: {exc}", file=sys.stderr)
        return 2
    summary = write_outputs(df, p, args.out, args.report_dir, args.metadata)
    print("Split written to " + str(args.out) + ": " + ", ".join(f"{s} {summary['sizes'][s]:,}" for s in SPLITS)
          + f"; max class-share deviation {summary['max_class_share_deviation']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
