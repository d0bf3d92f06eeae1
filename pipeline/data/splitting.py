"""The leakage-free split: nothing the model could memorise crosses a split boundary.

All images of one lesion (``split.group_column``), of one patient (``split.patient_column``, when the
metadata has it), every set of byte-identical files (md5 from the validation index) and every
group of near-duplicates (``near_group`` of the validation index) form one
connected group (:func:`connected_groups`), and a group lands in exactly one split. Within that
constraint the split is stratified by diagnosis (:func:`assign_groups`): groups are placed, largest
first (ties broken by a seeded shuffle), into the split whose quota for their diagnoses is least
filled. The rows are put in canonical order (by ``image_id``) first, so the same inputs and seed
give byte-identical outputs whatever the CSV's row order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from pipeline.core import params
from pipeline.core.errors import LesionflowError
from pipeline.core.layout import SPLITS
from pipeline.core.reporting import pyplot, save_figure


class SplitInputError(LesionflowError, ValueError):
    """Metadata or an index the split cannot use; the message names the column or the images."""


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
    df = (
        meta.sort_values("image_id", kind="stable").reset_index(drop=True)
        if "image_id" in meta.columns
        else meta.copy()
    )
    for col in ("image_id", p.group_column, p.stratify_column):
        if col not in df.columns:
            raise SplitInputError(f"metadata has no column {col!r} (columns: {list(df.columns)})")
    md5 = index.set_index("image_id")["md5"] if "md5" in index.columns else pd.Series(dtype=str)
    missing = sorted(set(df["image_id"]) - set(md5.index))
    if missing:
        raise SplitInputError(
            f"validation index has no entry for {len(missing)} image(s), e.g. {missing[:3]}: "
            "re-run the validate stage on this data"
        )
    df["_md5"] = df["image_id"].map(md5)
    near = index.set_index("image_id")["near_group"] if "near_group" in index.columns else pd.Series(dtype=str)
    df["_near"] = df["image_id"].map(near)
    keys = [p.group_column, "_md5", "_near"] + ([p.patient_column] if p.patient_column in df.columns else [])
    df["_group"] = connected_groups(df, keys)
    fractions = (p.train_fraction, p.val_fraction, p.test_fraction)
    df["split"] = np.asarray(SPLITS)[
        assign_groups(df["_group"].to_numpy(), df[p.stratify_column].astype(str).to_numpy(), fractions, p.seed)
    ]
    spans = df.groupby("_group")["split"].nunique()
    if (spans > 1).any():  # cannot happen by construction; a guard against future edits
        raise AssertionError(f"{int((spans > 1).sum())} group(s) span two splits")
    return df.drop(columns=["_md5", "_near", "_group"]).sort_values("image_id", kind="stable").reset_index(drop=True)


def split_counts(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per-class counts by split, with totals (a ``total`` row and column)."""
    table = pd.crosstab(df[column], df["split"]).reindex(columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return table


def summarise(df: pd.DataFrame, p: params.SplitParams) -> dict[str, Any]:
    """The split's figures, the leakage checks first (the report's; :func:`dvc_metrics` the DVC's)."""
    counts = split_counts(df, p.stratify_column)
    total = counts.loc["total", "total"]
    fractions = dict(zip(SPLITS, (p.train_fraction, p.val_fraction, p.test_fraction)))
    per_class = counts.drop(index="total")
    shares = per_class[list(SPLITS)].div(per_class["total"], axis=0)
    deviation = (shares - pd.Series(fractions)).abs()
    groups_per_split = df.groupby("split")[p.group_column].nunique()
    return {
        "lesions_spanning_splits": int((df.groupby(p.group_column)["split"].nunique() > 1).sum()),
        "max_class_share_deviation": round(float(deviation.to_numpy().max()), 4),
        "images": int(total),
        "lesions": int(df[p.group_column].nunique()),
        "sizes": {s: int(counts.loc["total", s]) for s in SPLITS},
        "fractions": {s: round(counts.loc["total", s] / total, 4) for s in SPLITS},
        "lesions_per_split": {s: int(groups_per_split.get(s, 0)) for s in SPLITS},
    }


def dvc_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The split's DVC metrics: leakage (lesions spanning splits), stratification (the largest
    class-share deviation) and the split sizes; the rest of :func:`summarise` is in the report."""
    keys = ("lesions_spanning_splits", "max_class_share_deviation", "sizes")
    return {k: summary[k] for k in keys}


def plot_counts(counts: pd.DataFrame, path: Path, title: str) -> None:
    """Images per diagnosis and split (log scale), and each diagnosis' split proportions."""
    plt = pyplot()
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
    save_figure(fig, path)


def render_markdown(
    counts: pd.DataFrame, summary: dict[str, Any], p: params.SplitParams, patient_grouping: bool
) -> str:
    """The split report: how it was grouped, the sizes, the per-class counts and the plot."""
    lines = [
        "# Train / validation / test split",
        "",
        f"Grouped by `{p.group_column}`"
        + (f" and `{p.patient_column}`" if patient_grouping else "")
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
