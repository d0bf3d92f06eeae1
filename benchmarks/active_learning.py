"""Benchmark: does the labelling queue choose better images to label than chance?

Starting from a small lesion-grouped labelled pool, each round labels ``--step`` more images of an
unlabelled pool and refits a logistic regression on the champion's frozen embeddings, choosing
them either at random (lesion by lesion, what a team without a queue does) or as
``lesionflow label queue`` does (:func:`pipeline.evaluation.labelqueue.rank`: uncertainty of the
regression's probabilities plus novelty against the labelled images, as a weighted k-centre), with
the ``entropy`` uncertainty (``queue``), the ``risk`` uncertainty (p(malignant) = the malignant
diagnoses' summed probability, threshold 0.5: the regression is class-balanced), and the entropy
with half of each round drawn at random (``mixed``, ``label_queue.random_share`` 0.5). Also
uncertainty alone (weight 0) and novelty alone, to see which part helps.

Run from the project root after ``make run``:
`python benchmarks/active_learning.py [--seeds 8]` -> benchmarks/results/active_learning.json
and active_learning.png (the curves).

The images are those the champion never trained on: the pool is the validation split, the
evaluation set the test split, cut in two halves by lesion (md5 of the lesion id). The novelty
weight and uncertainty are chosen on the ``choose`` half (the largest mean over rounds of balanced
accuracy and melanoma sensitivity, averaged) and every figure of the result is the ``report``
half's. Both arms use the same regression, features
and seeds. The embeddings come from a model trained on the training split's labels, which makes
every arm's regression better than one on ImageNet features would be.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import balanced_accuracy_score, recall_score  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from benchmarks.label_noise import dataset, halves  # noqa: E402
from pipeline.core import lineage, params  # noqa: E402
from pipeline.core.fsutil import write_json  # noqa: E402
from pipeline.evaluation import labelqueue  # noqa: E402

OUT = ROOT / "benchmarks/results/active_learning.json"
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
#: The random share of the ``mixed`` arms (label_queue.random_share).
RANDOM_SHARE = 0.5
METRICS = ("balanced_accuracy", "melanoma_sensitivity")
#: The malignant diagnoses' columns (the taxonomy's binary level), set by main().
MALIGNANT: list[int] = []


def fit_predict(x_train, y_train, x_eval, n_classes: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (every class, absent ones 0) of ``x_eval`` and of ``x_train``'s pool rows from a
    class-balanced logistic regression."""
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x_train, y_train)
    full = np.zeros((len(x_eval), n_classes))
    full[:, model.classes_] = model.predict_proba(x_eval)
    return full, model.classes_


def scores(y: np.ndarray, probs: np.ndarray, mel: int) -> dict[str, float]:
    """Balanced accuracy over the diagnoses and melanoma sensitivity (argmax)."""
    pred = probs.argmax(1)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "melanoma_sensitivity": float(recall_score(y == mel, pred == mel, zero_division=0)),
    }


def choose(arm: str, probs_pool, emb, labelled, available, step, weight, rng, lesions) -> np.ndarray:
    """The next ``step`` pool rows an arm labels."""
    cand = np.flatnonzero(available)
    if arm == "random":  # whole lesions at random, as a person drawing from a list would
        order = rng.permutation(np.unique(lesions[cand]))
        rows = [i for les in order for i in cand[lesions[cand] == les]]
        return np.asarray(rows[:step], dtype=int)
    if arm == "novelty":
        unc = np.zeros(len(cand))
        picked, _ = labelqueue.select(unc, emb[cand], labelqueue.novelty(emb[cand], emb[labelled]), step, 1.0)
        return cand[picked]
    kind = "risk" if arm == "risk" else "entropy"
    share = RANDOM_SHARE if arm == "mixed" else 0.0
    p_mal = probs_pool[cand][:, MALIGNANT].sum(1)
    q = labelqueue.rank(probs_pool[cand], emb[cand], emb[labelled], step, novelty_weight=weight, kind=kind,
                        p_malignant=p_mal, threshold=0.5, random_share=share,
                        seed=int(rng.integers(1 << 31)))  # fmt: skip
    return cand[q["row"].to_numpy(dtype=int)]


def curve(arm, emb, y, lesions, pool, evals, n_classes, mel, args, weight, seed) -> list[dict]:
    """One arm's scores on each evaluation half after every round."""
    rng = np.random.default_rng(seed)
    start_lesions = rng.permutation(np.unique(lesions[pool]))
    labelled = np.zeros(len(y), dtype=bool)
    for les in start_lesions:
        labelled[pool[lesions[pool] == les]] = True
        if labelled.sum() >= args.start:
            break
    in_pool = np.zeros(len(y), dtype=bool)
    in_pool[pool] = True
    points = []
    for _ in range(args.rounds + 1):
        x = emb[labelled]
        idx = np.flatnonzero(labelled)
        probs_all, _ = fit_predict(x, y[idx], emb, n_classes, args.c)
        row = {"labels": int(labelled.sum())}
        for name, ev in evals.items():
            row[name] = scores(y[ev], probs_all[ev], mel)
        points.append(row)
        available = in_pool & ~labelled
        if not available.any():
            break
        new = choose(arm, probs_all, emb, np.flatnonzero(labelled), available, args.step, weight, rng, lesions)
        labelled[new] = True
    return points


def mean_curve(runs: list[list[dict]], half: str, metric: str) -> tuple[list[int], list[float]]:
    """Labels and the seeds' mean of ``metric`` on ``half`` after each round."""
    n = min(len(r) for r in runs)
    labels = [int(np.mean([r[i]["labels"] for r in runs])) for i in range(n)]
    return labels, [float(np.mean([r[i][half][metric] for r in runs])) for i in range(n)]


def labels_to_reach(labels: list[int], values: list[float], target: float) -> int | None:
    """The fewest labels after which ``values`` is at least ``target`` (None: never)."""
    return next((n for n, v in zip(labels, values) if v >= target - 1e-12), None)


def plot(result: dict, path: Path) -> None:
    """The report half's mean curves of both metrics, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("balanced_accuracy", "melanoma_sensitivity")):
        for arm, c in result["curves"].items():
            share = f", random share {result['random_share']:g}" if result["chosen"].startswith("mixed") else ""
            shown = f"queue ({result['chosen']}{share})" if arm == "queue" else arm
            ax.plot(c["labels"], c[metric], marker="o", ms=3, label=shown)
        ax.set_xlabel("labelled images")
        ax.set_ylabel(metric.replace("_", " ") + " (report half)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Labelling queue vs random choice, mean of {result['seeds']} seeds ({result['model_md5'][:8]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_arms(emb, y, lesions, pool, evals, n_classes, mel, args) -> dict[str, list[list[dict]]]:
    """Every arm's curves over the seeds (the queue once per novelty weight)."""
    from tqdm.auto import tqdm

    arms = [("random", 0.0), ("novelty", 1.0)] + [(f"{kind} w={w:g}", w) for kind in ("queue", "risk", "mixed")
                                                    for w in WEIGHTS]  # fmt: skip
    runs: dict[str, list[list[dict]]] = {}
    for name, w in tqdm(arms, desc="arms", unit="arm"):
        kind = name.split(" ")[0]
        runs[name] = [curve(kind, emb, y, lesions, pool, evals, n_classes, mel, args, w, s) for s in range(args.seeds)]
    return runs


def summarise(runs: dict, args) -> dict:
    """The queue's configuration chosen on the choose half (the largest mean, over rounds, of the
    two metrics' average), and the report half's curves and labels-to-reach."""
    area = {n: float(np.mean([np.mean(mean_curve(r, "choose", m)[1]) for m in METRICS])) for n, r in runs.items()}
    queues = [n for n in runs if n.split(" ")[0] in ("queue", "risk", "mixed")]
    chosen = max(queues, key=area.get)
    shown = {"random": runs["random"], "queue": runs[chosen], "uncertainty only": runs["queue w=0"],
             "novelty only": runs["novelty"]}  # fmt: skip
    curves, reach = {}, {}
    for arm, r in shown.items():
        labels, ba = mean_curve(r, "report", "balanced_accuracy")
        _, sens = mean_curve(r, "report", "melanoma_sensitivity")
        curves[arm] = {"labels": labels, "balanced_accuracy": ba, "melanoma_sensitivity": sens}
    full = curves["random"]["labels"][-1]
    for metric in ("balanced_accuracy", "melanoma_sensitivity"):
        target = curves["random"][metric][-1]
        reach[metric] = {
            "random_at_full_budget": round(target, 4),
            "full_budget": full,
            **{arm: labels_to_reach(c["labels"], c[metric], target) for arm, c in curves.items()},
        }
    return {"choose_half_area": area, "chosen": chosen, "curves": curves, "labels_to_reach": reach}


def counts(y: np.ndarray, rows: np.ndarray, mel: int) -> dict[str, int]:
    """Images and melanomas among ``rows``."""
    return {"images": int(len(rows)), "melanoma": int((y[rows] == mel).sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--start", type=int, default=50, help="labelled images to start from (whole lesions)")
    ap.add_argument("--step", type=int, default=50, help="images labelled per round")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--c", type=float, default=1.0, help="the regression's inverse regularisation")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    classes, frame, emb, _, y = dataset()
    lesions = frame["lesion_id"].astype(str).to_numpy()
    split = frame["split"].to_numpy()
    half = halves(frame["lesion_id"])
    pool = np.flatnonzero(split == "val")
    evals = {h: np.flatnonzero((split == "test") & (half == h)) for h in ("choose", "report")}
    mel = classes.index("mel")
    tax = params.load_taxonomy(ROOT / "params.yaml")
    MALIGNANT[:] = [i for i, c in enumerate(classes) if tax.labels([c], "binary")[0] == tax.binary_positive]
    runs = run_arms(emb, y, lesions, pool, evals, len(classes), mel, args)
    result = {
        "benchmark": "active_learning",
        "machine": machine(),
        "model_md5": lineage.file_md5(ROOT / "artifacts/model/model.pt"),
        "pool": {"split": "val", **counts(y, pool, mel)},
        "evaluation": {h: {"split": "test", **counts(y, ev, mel)} for h, ev in evals.items()},
        "start": args.start, "step": args.step, "rounds": args.rounds, "seeds": args.seeds, "c": args.c,
        "weights": list(WEIGHTS),
        "random_share": RANDOM_SHARE,
        **summarise(runs, args),
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({"chosen": result["chosen"], "labels_to_reach": result["labels_to_reach"]}, indent=2))
    print(f"-> {args.out}, {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
