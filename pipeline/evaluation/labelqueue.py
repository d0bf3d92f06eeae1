"""The labelling queue: which unlabelled images a dermatologist should label first, ranked by how
much a label would teach the model (``lesionflow label queue``, ``benchmarks/active_learning.py``).

The order, for a budget of ``n`` labels:

1. every answer a clinician **disputed** (the page's "disagree" control), in the order given;
2. every image the model **refused** (an image-quality check or the out-of-distribution detector):
   the model cannot judge it, so only a person can say whether it belongs in the data;
3. the rest by **uncertainty and novelty**, chosen greedily as a weighted k-centre: each pick is the
   image with the largest ``uncertainty + novelty_weight * distance``, where ``uncertainty`` is the
   normalised entropy (or ``1 - margin``) of the calibrated diagnosis probabilities (``risk``: its
   mean with how close p(malignant) is to the operating threshold, so that the queue also asks
   about the images whose benign/malignant decision is in doubt) and
   ``distance`` the cosine distance of its embedding to the nearest image the model already knows
   (the retrieval index: its training images) or already picked, scaled by the largest distance
   of the pool to the index. A pick makes its near-duplicates close to something picked, so the
   queue does not spend its budget on ten views of one lesion;
4. interleaved with those, a ``random_share`` of the rest drawn at random (reason ``random``):
   choosing only what the model is unsure of skews the labelled data (``benchmarks/active_learning.py``
   measured melanoma sensitivity falling behind random choice that way); a random part keeps it
   representative.

NumPy and pandas only (and :func:`pipeline.model.retrieval.normalise`, the embeddings' one unit
scaling); the prediction and the index come from the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.model.retrieval import normalise

#: The queue's reasons, in the order they are served.
DISPUTED, REFUSED, INFORMATIVE, RANDOM = "disputed", "refused", "informative", "random"
#: The uncertainty measures a queue may use (``label_queue.uncertainty``).
UNCERTAINTY = ("entropy", "margin", "risk")


def closeness(p_malignant: np.ndarray, threshold: float) -> np.ndarray:
    """1 where p(malignant) is at the operating ``threshold``, falling linearly to 0 at 0 and 1."""
    p = np.clip(np.asarray(p_malignant, dtype=np.float64), 0.0, 1.0)
    t = float(threshold)
    return np.clip(1.0 - np.abs(p - t) / np.where(p < t, max(t, 1e-9), max(1.0 - t, 1e-9)), 0.0, 1.0)


def uncertainty(
    probs: np.ndarray, kind: str = "entropy", p_malignant: np.ndarray | None = None, threshold: float = 0.5
) -> np.ndarray:
    """Per row of ``probs`` (n, k; rows summing to 1) a value in [0, 1]: the entropy divided by
    ``log k`` (``entropy``), one minus the gap between the two largest probabilities (``margin``),
    or the entropy's mean with :func:`closeness` of ``p_malignant`` to ``threshold`` (``risk``).
    1 is a uniform answer, 0 a certain one."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probabilities: expected (n, k>=2), got shape {p.shape}")
    if kind == "risk":
        if p_malignant is None:
            raise ValueError("uncertainty 'risk' needs p(malignant)")
        return 0.5 * uncertainty(p, "entropy") + 0.5 * closeness(p_malignant, threshold)
    if kind == "entropy":
        h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)
        return np.clip(h / np.log(p.shape[1]), 0.0, 1.0)
    if kind == "margin":
        top = np.sort(p, axis=1)[:, -2:]
        return np.clip(1.0 - (top[:, 1] - top[:, 0]), 0.0, 1.0)
    raise ValueError(f"uncertainty: expected one of {', '.join(UNCERTAINTY)}, got {kind!r}")


def novelty(embeddings: np.ndarray, known: np.ndarray | None, chunk: int = 1024) -> np.ndarray:
    """The cosine distance (1 - cosine similarity, in [0, 2]) of each embedding to its nearest
    ``known`` one (all 1 when nothing is known)."""
    q = normalise(embeddings)
    if known is None or len(known) == 0:
        return np.ones(len(q))
    k = normalise(known)
    out = np.empty(len(q))
    for s in range(0, len(q), chunk):
        out[s : s + chunk] = 1.0 - (q[s : s + chunk] @ k.T).max(1)
    return np.clip(out, 0.0, 2.0)


def select(
    unc: np.ndarray,
    embeddings: np.ndarray,
    dist: np.ndarray,
    budget: int,
    novelty_weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The greedy weighted k-centre picks of the module docstring: ``(order, distance)``, the
    indices of up to ``budget`` rows in the order chosen and each pick's scaled distance when it
    was chosen. ``dist``: each row's :func:`novelty` against the known embeddings. ``novelty_weight``
    0 ranks by uncertainty alone."""
    n = len(unc)
    budget = min(int(budget), n)
    if budget <= 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    q = normalise(embeddings)
    dist = np.asarray(dist, dtype=np.float64)
    scale = float(dist.max()) or 1.0
    available = np.ones(n, dtype=bool)
    order, chosen_dist = [], []
    for _ in range(budget):
        score = np.where(available, np.asarray(unc) + novelty_weight * dist / scale, -np.inf)
        i = int(np.argmax(score))
        order.append(i)
        chosen_dist.append(dist[i] / scale)
        available[i] = False
        dist = np.minimum(dist, np.clip(1.0 - q @ q[i], 0.0, 2.0))
    return np.asarray(order, dtype=int), np.asarray(chosen_dist)


def rank(
    probs: np.ndarray,
    embeddings: np.ndarray,
    known: np.ndarray | None,
    budget: int,
    *,
    refused: Sequence[bool] | None = None,
    disputed: Sequence[bool] | None = None,
    kind: str = "entropy",
    novelty_weight: float = 1.0,
    p_malignant: np.ndarray | None = None,
    threshold: float = 0.5,
    random_share: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    """The queue of ``budget`` rows (see the module docstring): one row per pick with ``row`` (the
    index into the inputs), ``rank`` (1 first), ``reason``, ``uncertainty``, ``novelty`` (the
    distance to the index) and ``distance`` (to the index or an earlier pick, scaled; empty for
    disputed and refused rows). ``p_malignant`` and ``threshold``: for the ``risk`` uncertainty;
    ``random_share`` of the rest drawn with ``seed``."""
    n = len(probs)
    unc = uncertainty(probs, kind, p_malignant, threshold)
    nov = novelty(embeddings, known)
    flags = {
        DISPUTED: np.asarray(disputed if disputed is not None else np.zeros(n), dtype=bool),
        REFUSED: np.asarray(refused if refused is not None else np.zeros(n), dtype=bool),
    }
    flags[REFUSED] &= ~flags[DISPUTED]
    rows: list[dict[str, Any]] = []
    for reason in (DISPUTED, REFUSED):
        for i in np.flatnonzero(flags[reason]):
            rows.append({"row": int(i), "reason": reason, "distance": np.nan})
    rest = np.flatnonzero(~(flags[DISPUTED] | flags[REFUSED]))
    left = min(max(0, budget - len(rows)), len(rest))
    n_random = int(round(random_share * left))
    picked, dist = select(unc[rest], np.asarray(embeddings)[rest], nov[rest], left - n_random, novelty_weight)
    chosen = [{"row": int(rest[i]), "reason": INFORMATIVE, "distance": float(d)} for i, d in zip(picked, dist)]
    others = np.setdiff1d(np.arange(len(rest)), picked)
    drawn = np.random.default_rng(seed).choice(others, size=min(n_random, len(others)), replace=False)
    rows += interleave(chosen, [{"row": int(rest[i]), "reason": RANDOM, "distance": np.nan} for i in drawn])
    out = pd.DataFrame(rows[:budget], columns=["row", "reason", "distance"])
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    out["uncertainty"] = unc[out["row"].to_numpy(dtype=int)] if len(out) else []
    out["novelty"] = nov[out["row"].to_numpy(dtype=int)] if len(out) else []
    return out


def interleave(a: list, b: list) -> list:
    """``a`` and ``b`` merged evenly, each in its order, ``a`` first (every prefix holds both in
    proportion)."""
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if j == len(b) or (i < len(a) and i / len(a) <= j / len(b)):
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out
