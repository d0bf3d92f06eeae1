"""Evidence for the similar-cases feature: how good are the k most similar training cases, by the
model's own embeddings, at the diagnosis, next to the model's softmax (on the test split)?

* the kNN vote (similarity-weighted, one case per lesion): balanced accuracy over the diagnoses
  and ROC-AUC of its malignant share, beside the softmax's;
* precision@k: the share of the k cases with the query's diagnosis (and precision@1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from pipeline.core.taxonomy import Taxonomy
from pipeline.evaluation.predictions import Predictions, binary_truth
from pipeline.model.retrieval import RetrievalIndex, knn_vote


def knn_evidence(index: RetrievalIndex, test: Predictions, tax: Taxonomy, k: int) -> dict[str, Any] | None:
    """The kNN evidence of ``index`` on ``test`` (None when there are no dx predictions or embeddings)."""
    dx_probs = test.level("dx")
    if dx_probs is None or test.embeddings is None:
        return None
    classes = list(tax.classes("dx"))
    neighbours = index.query(test.embeddings, k)
    vote = knn_vote(neighbours, classes)
    y = tax.encode(test.frame["dx"], "dx")
    truth = np.asarray(test.frame["dx"].astype(str))
    malignant = [j for j, c in enumerate(classes) if tax.labels([c], "binary")[0] == tax.binary_positive]
    y01 = binary_truth(test.frame, tax)
    agree = [np.mean([c.dx == t for c in cases]) if cases else 0.0 for cases, t in zip(neighbours, truth)]
    first = [bool(cases) and cases[0].dx == t for cases, t in zip(neighbours, truth)]
    return {
        "k": k,
        "n": int(len(y)),
        "index_size": len(index),
        "knn": {
            "balanced_accuracy": float(balanced_accuracy_score(y, vote.argmax(1))),
            "binary_roc_auc": float(roc_auc_score(y01, vote[:, malignant].sum(1))),
        },
        "softmax": {
            "balanced_accuracy": float(balanced_accuracy_score(y, dx_probs.argmax(1))),
            "binary_roc_auc": float(roc_auc_score(y01, test.p_malignant)),
        },
        "precision_at_k": float(np.mean(agree)),
        "precision_at_1": float(np.mean(first)),
    }
