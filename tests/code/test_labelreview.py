"""Label review on synthetic embeddings (pipeline.evaluation.labelreview): out-of-fold probabilities
never come from a fold that saw the lesion, flipped labels rise to the top of the ranking with the
right suggestion, the evidence is other lesions' confirmed cases, and noise is class-conditional."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.evaluation import labelreview as lr


def blobs(n_lesions: int = 400, per_lesion: int = 2, classes: int = 4, dim: int = 16, seed: int = 0):
    """Images of lesions around their class's centre; a lesion's images close to each other."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3.0, (classes, dim))
    lesion_class = rng.integers(0, classes, n_lesions)
    lesion_centre = centres[lesion_class] + rng.normal(0, 1.0, (n_lesions, dim))
    x = np.repeat(lesion_centre, per_lesion, axis=0) + rng.normal(0, 0.3, (n_lesions * per_lesion, dim))
    labels = np.repeat(lesion_class, per_lesion)
    groups = np.repeat(np.arange(n_lesions), per_lesion)
    return x, labels, groups


def test_out_of_fold_probabilities_never_learn_a_lesion_from_its_own_images():
    # each lesion gets its own feature and a random label: only a fold that saw the lesion could know it
    rng = np.random.default_rng(1)
    n_lesions, per = 200, 3
    groups = np.repeat(np.arange(n_lesions), per)
    labels = np.repeat(rng.integers(0, 2, n_lesions), per)
    x = np.eye(n_lesions)[groups] + rng.normal(0, 0.01, (len(groups), n_lesions))
    probs = lr.out_of_fold_probs(x, labels, groups, n_classes=2, folds=5, seed=0)
    assert probs.shape == (len(labels), 2) and np.allclose(probs.sum(axis=1), 1)
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    assert accuracy < 0.65  # chance, not memory of the lesion's other images


def test_flipped_labels_rank_first_with_the_true_class_suggested():
    x, labels, groups = blobs()
    confusion = np.ones((4, 4))
    confusion[0, 1] = confusion[1, 2] = confusion[2, 3] = confusion[3, 0] = 10
    noisy, flipped = lr.flip_labels(labels, 0.05, 4, confusion, seed=3)
    assert 0.04 <= flipped.mean() <= 0.06
    assert all(noisy[i] == (labels[i] + 1) % 4 for i in np.flatnonzero(flipped))  # where the confusion points
    probs = lr.out_of_fold_probs(x, noisy, groups, n_classes=4, folds=5, seed=0)
    ranked = lr.rank_label_issues(noisy, probs)
    assert list(ranked["rank"]) == list(range(1, len(noisy) + 1))
    assert lr.share_found_in_top(ranked.index.to_numpy(), flipped, 0.10) >= 0.9
    top = ranked.head(int(flipped.sum()))
    hits = top.index[flipped[top.index]]
    assert (ranked.loc[hits, "suggested"].to_numpy() == labels[hits]).mean() >= 0.9
    assert ranked["is_issue"].head(int(ranked["is_issue"].sum())).all()  # flagged ones first


def test_ranking_by_loss_puts_the_least_supported_label_first():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert list(lr.rank_by_loss(np.array([0, 0, 0]), probs)) == [1, 2, 0]
    assert lr.share_found_in_top(np.array([1, 2, 0]), np.array([False, True, False]), 0.34) == 1.0


def test_the_evidence_is_other_lesions_confirmed_cases_most_similar_first():
    emb = np.array([[1.0, 0.0], [0.99, 0.14], [0.8, 0.6], [0.0, 1.0], [0.995, 0.1]])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    frame = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e"],
            "lesion_id": ["L1", "L1", "L2", "L3", "L4"],
            "dx": ["nv", "nv", "mel", "bkl", "nv"],
            "dx_type": ["histo", "histo", "histo", "histo", "follow_up"],
        }
    )
    (cases,) = lr.similar_confirmed(emb, [0], frame, k=2)
    assert [c["image_id"] for c in cases] == ["c", "d"]  # not b (same lesion), not e (not confirmed)
    assert cases[0]["dx"] == "mel" and cases[0]["similarity"] > cases[1]["similarity"]


def test_issue_rates_per_diagnosis_and_confirmation():
    frame = pd.DataFrame({"dx": ["nv", "nv", "mel", "mel"], "dx_type": ["histo", "follow_up", "histo", "histo"],
                          "is_issue": [True, False, False, False]})  # fmt: skip
    assert lr.issue_rates(frame, "dx") == {"mel": {"images": 2, "issues": 0, "rate": 0.0},
                                           "nv": {"images": 2, "issues": 1, "rate": 0.5}}  # fmt: skip
    assert lr.issue_rates(frame, "dx_type")["histo"] == {"images": 3, "issues": 1, "rate": 0.3333}
