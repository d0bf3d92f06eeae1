"""Label review: which labelled images a dermatologist should check again.

Out-of-fold class probabilities for every labelled image (a lesion-grouped, stratified k-fold
logistic regression on the leading principal components of the model's embeddings: cheap on 2
cores, and no image is scored by a fold that saw its lesion), then confident learning
(``cleanlab``) over them: the images whose given label the other folds contradict, ranked by how
little they support it, with the label they suggest. Beside each suspect, the most similar images
of other lesions whose diagnosis was confirmed by histopathology: the evidence a reviewer looks at
first.

    probs = out_of_fold_probs(embeddings, labels, lesion_ids, n_classes=7, folds=5, seed=0)
    ranked = rank_label_issues(labels, probs)            # worst first, with suggested labels
    baseline = rank_by_loss(labels, model_probs)         # what a user would do: the model's own loss

Nothing here changes a label: a suspect is a row to review, in whichever split it lies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: How a diagnosis was confirmed that makes a case evidence for others (HAM10000's ``dx_type``).
CONFIRMED = ("histo",)


def out_of_fold_probs(
    x: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[Any],
    n_classes: int,
    folds: int = 5,
    seed: int = 0,
    c: float = 1.0,
    max_iter: int = 2000,
    components: int = 128,
) -> np.ndarray:
    """``(n, n_classes)`` probabilities of every row from a logistic regression on the first
    ``components`` whitened principal components, fitted on the folds that do not hold its group
    (``StratifiedGroupKFold``: a lesion's images in one fold). A class a training fold lacks gets
    probability 0 there."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline

    labels = np.asarray(labels)
    if len(labels) != len(x) or len(groups) != len(x):
        raise ValueError(f"{len(x)} embeddings, {len(labels)} labels and {len(groups)} groups: they must agree")
    out = np.zeros((len(x), n_classes), dtype=np.float64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held in splitter.split(x, labels, groups=np.asarray(groups)):
        pca = PCA(n_components=min(components, len(train), x.shape[1]), whiten=True, random_state=seed)
        model = make_pipeline(pca, LogisticRegression(C=c, max_iter=max_iter))
        model.fit(x[train], labels[train])
        out[np.ix_(held, model.classes_)] = model.predict_proba(x[held])
    return out


def rank_label_issues(labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Every row ranked: first those ``cleanlab.filter.find_label_issues`` flags (``is_issue``:
    pruning by the estimated noise rates), then the others, each by increasing label quality
    (``cleanlab.rank.get_label_quality_scores``, self-confidence: the out-of-fold probability of
    the given label); with the ``suggested`` class and its probability. Index: the row's position in ``labels``."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    issue = find_label_issues(labels, probs, filter_by="prune_by_noise_rate")
    suggested = probs.argmax(axis=1)
    frame = pd.DataFrame(
        {
            "label": labels,
            "label_quality": quality,
            "is_issue": issue,
            "suggested": suggested,
            "p_given": probs[np.arange(len(labels)), labels],
            "p_suggested": probs[np.arange(len(labels)), suggested],
        }
    )
    # flagged rows first, each group by increasing label quality (np.lexsort: the last key is the first)
    order = np.lexsort((np.arange(len(frame)), frame["label_quality"].to_numpy(), ~frame["is_issue"].to_numpy()))
    return frame.iloc[order].assign(rank=np.arange(1, len(frame) + 1))


def rank_by_loss(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Row positions by decreasing cross-entropy of the given label: the ranking a user without
    confident learning would write from a model's predictions."""
    p = np.clip(np.asarray(probs)[np.arange(len(labels)), np.asarray(labels)], 1e-12, 1.0)
    return np.argsort(np.log(p), kind="stable")


def share_found_in_top(order: np.ndarray, flipped: np.ndarray, top_share: float) -> float:
    """The share of the ``flipped`` rows (a boolean mask) that ``order`` puts in its first
    ``top_share`` of rows."""
    top = order[: max(1, int(round(top_share * len(order))))]
    n = int(np.count_nonzero(flipped))
    return float(np.count_nonzero(flipped[top]) / n) if n else float("nan")


def similar_confirmed(
    embeddings: np.ndarray,
    rows: Sequence[int],
    frame: pd.DataFrame,
    k: int = 3,
    confirmed: Sequence[str] = CONFIRMED,
) -> list[list[dict[str, Any]]]:
    """For each of ``rows``, the ``k`` most similar images (cosine of L2-normalised
    ``embeddings``) of *other* lesions whose diagnosis ``frame.dx_type`` says was confirmed:
    ``{"image_id", "dx", "similarity"}``. ``frame``: ``image_id``, ``lesion_id``, ``dx``, ``dx_type``
    in the embeddings' order."""
    pool = np.flatnonzero(frame["dx_type"].isin(list(confirmed)).to_numpy())
    if not len(pool):
        return [[] for _ in rows]
    lesions = frame["lesion_id"].to_numpy()
    sims = embeddings[list(rows)] @ embeddings[pool].T
    found = []
    for i, row in enumerate(rows):
        order = pool[np.argsort(-sims[i], kind="stable")]
        keep = [j for j in order if lesions[j] != lesions[row]][:k]
        lookup = dict(zip(pool, sims[i], strict=True))
        found.append(
            [
                {
                    "image_id": frame["image_id"].iat[j],
                    "dx": frame["dx"].iat[j],
                    "similarity": round(float(lookup[j]), 4),
                }
                for j in keep
            ]  # fmt: skip
        )
    return found


def issue_rates(frame: pd.DataFrame, by: str) -> dict[str, dict[str, float | int]]:
    """Per value of column ``by`` (``dx``, ``dx_type``): images, suspected label issues and their
    share. ``frame`` holds ``is_issue``."""
    out = {}
    for value, g in frame.groupby(by, sort=True):
        n, issues = len(g), int(g["is_issue"].sum())
        out[str(value)] = {"images": n, "issues": issues, "rate": round(issues / n, 4) if n else 0.0}
    return out


def flip_labels(
    labels: np.ndarray, share: float, n_classes: int, confusion: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Class-conditional label noise, as real label noise is: ``share`` of the rows of each class
    get the class that ``confusion`` (rows: given, columns: predicted; the diagonal ignored)
    confuses it with most. Returns the noisy labels and the mask of flipped rows."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    cm = np.asarray(confusion, dtype=float).copy()
    np.fill_diagonal(cm, -1)
    noisy, flipped = labels.copy(), np.zeros(len(labels), dtype=bool)
    for cls in range(n_classes):
        rows = np.flatnonzero(labels == cls)
        pick = rng.choice(rows, size=int(round(share * len(rows))), replace=False) if len(rows) else rows
        noisy[pick] = int(cm[cls].argmax())
        flipped[pick] = True
    return noisy, flipped


def review(frame: pd.DataFrame, embeddings: np.ndarray, classes: Sequence[str], p: Any) -> pd.DataFrame:
    """Every labelled image (``frame``: ``image_id``, ``lesion_id``, ``dx``, ``dx_type``, ``split``;
    ``embeddings`` in its order) ranked by :func:`rank_label_issues` over out-of-fold
    probabilities at the diagnosis level, with the frame's columns, the given and suggested
    diagnoses and, for the suspects, their most similar confirmed cases. ``p``: the ``review`` params."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(frame["dx"]) - set(index))
    if unknown:
        raise ValueError(f"diagnoses {unknown} are not among the taxonomy's {list(classes)}")
    labels = frame["dx"].map(index).to_numpy()
    probs = out_of_fold_probs(embeddings, labels, frame["lesion_id"].tolist(), len(classes), p.folds, p.seed,
                              p.c, p.max_iter, p.components)  # fmt: skip
    ranked = rank_label_issues(labels, probs)
    out = frame.iloc[ranked.index].reset_index(drop=True)
    out.insert(0, "rank", ranked["rank"].to_numpy())
    out["given"] = [classes[i] for i in ranked["label"]]
    out["suggested"] = [classes[i] for i in ranked["suggested"]]
    for col in ("p_given", "p_suggested", "label_quality"):
        out[col] = ranked[col].round(4).to_numpy()
    out["is_issue"] = ranked["is_issue"].to_numpy()
    suspects = ranked.index[ranked["is_issue"].to_numpy()].tolist()
    evidence = similar_confirmed(embeddings, suspects, frame.reset_index(drop=True), p.similar, p.confirmed)
    text = ["; ".join(f"{c['image_id']} {c['dx']} {c['similarity']:.2f}" for c in cases) for cases in evidence]
    out["similar_confirmed"] = text + [""] * (len(out) - len(text))
    return out


def metrics(ranked: pd.DataFrame) -> dict[str, Any]:
    """The DVC metrics of a review: suspects, their share, those in the test split, those a person
    already decided on (column ``reviewed``, when present), and the suspect rate per diagnosis
    (given) and per confirmation type."""
    n, issues = len(ranked), int(ranked["is_issue"].sum())
    reviewed = ranked["reviewed"] != "" if "reviewed" in ranked else pd.Series(False, index=ranked.index)
    return {
        "images": n,
        "suspects": issues,
        "suspect_share": round(issues / n, 4) if n else 0.0,
        "test_split_suspects": int(ranked.loc[ranked["split"] == "test", "is_issue"].sum()),
        "reviewed_suspects": int((ranked["is_issue"] & reviewed).sum()),
        "by_diagnosis": {k: v["rate"] for k, v in issue_rates(ranked, "dx").items()},
        "by_confirmation": {k: v["rate"] for k, v in issue_rates(ranked, "dx_type").items()},
    }


#: The columns of ``label_issues.csv``, in order.
CSV_COLUMNS = ("rank", "image_id", "lesion_id", "split", "dx_type", "given", "suggested", "p_given", "p_suggested",
               "label_quality", "similar_confirmed", "reviewed")  # fmt: skip


def write_reports(ranked: pd.DataFrame, reports: Path, image_path: Callable[[str], Path], p: Any) -> dict[str, Any]:
    """``label_issues.csv`` (the suspects, worst first, with their evidence), ``contact_sheet.png``
    (the first ``p.sheet_rows`` suspects beside their confirmed look-alikes), ``metrics.json``
    and ``summary.md`` in ``reports``; returns the metrics."""
    from pipeline.core import fsutil
    from pipeline.core.sheets import contact_grid

    suspects = ranked[ranked["is_issue"]]
    fsutil.atomic_write_text(
        reports / "label_issues.csv", suspects[[c for c in CSV_COLUMNS if c in suspects]].to_csv(index=False)
    )
    rows = []
    for r in suspects.head(p.sheet_rows).itertuples():
        tiles = [(image_path(r.image_id), f"#{r.rank} {r.image_id} {r.given}->{r.suggested} {r.p_suggested:.2f}")]
        for case in filter(None, r.similar_confirmed.split("; ")):
            image_id, dx, sim = case.split(" ")
            tiles.append((image_path(image_id), f"{image_id} {dx} (histo) {sim}"))
        rows.append(tiles)
    contact_grid(rows, reports / "contact_sheet.png", tile=(160, 120), gap=8)
    found = metrics(ranked)
    fsutil.write_json(reports / "metrics.json", found, sort_keys=False)
    fsutil.atomic_write_text(reports / "summary.md", summary_markdown(suspects, found))
    return found


def summary_markdown(suspects: pd.DataFrame, m: dict[str, Any]) -> str:
    """The review for a person: how many suspects, where, and the first of them."""
    lines = [
        "# Label review",
        "",
        f"{m['suspects']:,} of {m['images']:,} labelled images ({100 * m['suspect_share']:.1f} %) have a label the "
        "other folds contradict (out-of-fold logistic regression on the model's embeddings, lesion-grouped; "
        f"confident learning). {m['test_split_suspects']} of them are in the test split: reported, never relabelled "
        "here; a reviewer's decision is what changes a label.",
        "",
        "| given diagnosis | suspect rate |",
        "|---|---|",
        *[f"| {k} | {100 * v:.1f} % |" for k, v in m["by_diagnosis"].items()],
        "",
        "| confirmed by | suspect rate |",
        "|---|---|",
        *[f"| {k} | {100 * v:.1f} % |" for k, v in m["by_confirmation"].items()],
        "",
        "First suspects (all in `label_issues.csv`, the first on `contact_sheet.png`):",
        "",
        "| rank | image | split | confirmed by | given | suggested | p(suggested) |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r.rank} | {r.image_id} | {r.split} | {r.dx_type} | {r.given} | {r.suggested} | {r.p_suggested:.2f} |"
            for r in suspects.head(15).itertuples()
        ],  # fmt: skip
    ]
    return "\n".join(lines) + "\n"
