"""pipeline.evaluation.metrics against hand-computed values on small fixed predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.evaluation import bootstrap as B
from pipeline.evaluation import metrics as M
from pipeline.evaluation import subgroups as SG

# 3 classes, predictions = argmax: [0, 1, 1, 1, 2, 0] for truth [0, 0, 1, 1, 2, 2]
Y3 = np.array([0, 0, 1, 1, 2, 2])
P3 = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.6, 0.2],
        [0.1, 0.1, 0.8],
        [0.5, 0.1, 0.4],
    ]
)

# binary: 10 negatives, 4 positives (ranked by hand in the comments below)
NEG = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
POS = [0.97, 0.92, 0.85, 0.35]
YB = np.array([0] * 10 + [1] * 4)
SB = np.array(NEG + POS)


def test_multiclass_report_hand_computed():
    r = M.multiclass_report(Y3, P3, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6)
    # recalls 1/2, 2/2, 1/2
    assert r["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    pc = r["per_class"]
    assert [pc[c]["precision"] for c in "abc"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert [pc[c]["recall"] for c in "abc"] == pytest.approx([0.5, 1.0, 0.5])
    assert [pc[c]["f1"] for c in "abc"] == pytest.approx([0.5, 0.8, 2 / 3])
    assert [pc[c]["support"] for c in "abc"] == [2, 2, 2]
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert r["confusion"]["counts"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert r["confusion"]["normalized"] == [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]
    # class a vs rest: positives score 0.7, 0.4; negatives 0.1, 0.2, 0.1, 0.5 -> pairs won 4 + 3 of 8
    assert pc["a"]["roc_auc"] == pytest.approx(7 / 8)
    assert r["roc_auc_macro"] == pytest.approx(np.mean([pc[c]["roc_auc"] for c in "abc"]))


def test_multiclass_report_absent_class_metrics_are_not_defined_not_zero():
    """A class absent from a set (an external set without dermatofibromas) has no recall, F1 or AUC
    there, and a class never predicted no precision: None, which reports print as not defined."""
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1]])
    r = M.multiclass_report(y, p, ["a", "b", "c"])
    c = r["per_class"]["c"]
    assert (c["roc_auc"], c["pr_auc"], c["recall"], c["f1"], c["precision"]) == (None,) * 5
    assert c["support"] == 0
    assert r["per_class"]["a"]["recall"] == pytest.approx(0.5)
    assert r["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    q = np.array([[0.9, 0.05, 0.05], [0.2, 0.1, 0.7], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1]])
    absent_predicted = M.multiclass_report(y, q, ["a", "b", "c"])["per_class"]["c"]
    assert absent_predicted["precision"] == 0.0 and absent_predicted["recall"] is None
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))
    assert r["confusion"]["normalized"][2] == [0.0, 0.0, 0.0]


def test_binary_report_hand_computed():
    r = M.binary_report(YB, SB)
    # positives beat 10, 9, 8 and 3 of the 10 negatives
    assert r["roc_auc"] == pytest.approx(30 / 40)
    # specificity >= 90%: at most 1 false positive -> threshold 0.92 catches 2 of 4
    assert r["sensitivity_at_specificity_90"] == pytest.approx(0.5)
    # specificity >= 95%: no false positive -> threshold 0.97 catches 1 of 4
    assert r["sensitivity_at_specificity_95"] == pytest.approx(0.25)
    # sensitivity >= 90% needs all 4 positives: threshold 0.35 lets 7 negatives through
    assert r["specificity_at_sensitivity_90"] == pytest.approx(0.3)
    assert r["specificity_at_sensitivity_95"] == pytest.approx(0.3)
    # sensitivity in [0.8, 1] only on the vertical segment at specificity 0.3: 0.2 * 0.3
    assert r["pauc_above_sensitivity_80"] == pytest.approx(0.06)
    assert r["pr_auc"] == pytest.approx(skm.average_precision_score(YB, SB))
    assert r["curves"]["roc"]["fpr"][0] == 0 and r["curves"]["roc"]["tpr"][-1] == 1


def test_partial_auc_perfect_and_reversed():
    y = np.array([0, 0, 1, 1])
    assert M.partial_auc_above_sensitivity(y, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.2)
    assert M.partial_auc_above_sensitivity(y, np.array([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.0)


def test_reliability_hand_computed():
    r = M.reliability([0, 0, 1, 0], [0.05, 0.15, 0.8, 0.9], n_bins=2)
    # bin [0, .5): mean .1 vs 0 observed; bin [.5, 1]: mean .85 vs .5 observed
    assert r["ece"] == pytest.approx(0.5 * 0.1 + 0.5 * 0.35)
    assert r["mce"] == pytest.approx(0.35)
    assert [b["count"] for b in r["bins"]] == [2, 2]
    top = M.top_label_reliability(Y3, P3, n_bins=10)
    assert sum(b["count"] for b in top["bins"]) == len(Y3)


def test_choose_threshold_hand_computed():
    t = M.choose_threshold(YB, SB, 0.75)
    assert t["threshold"] == pytest.approx(0.85)
    assert t["sensitivity"] == pytest.approx(0.75) and t["specificity"] == pytest.approx(0.8)
    t = M.choose_threshold(YB, SB, 0.95)
    assert t["threshold"] == pytest.approx(0.35) and t["sensitivity"] == 1.0
    assert (t["tp"], t["fn"], t["fp"], t["tn"]) == (4, 0, 7, 3)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_threshold_meets_target_sensitivity_on_validation(seed, target):
    rng = np.random.default_rng(seed)
    y = rng.random(400) < 0.2
    score = np.clip(rng.normal(0.3 + 0.3 * y, 0.2), 0, 1).round(2)  # rounding makes ties
    t = M.choose_threshold(y, score, target)
    sens = np.mean(score[y] >= t["threshold"])
    assert sens >= target and t["sensitivity"] == pytest.approx(sens)
    # it is the highest such threshold: the next higher score misses the target
    higher = score[score > t["threshold"]]
    if higher.size:
        assert np.mean(score[y] >= higher.min()) < target


def test_weighted_metrics_equal_sklearn_on_repeated_samples():
    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, 4, n)
    p = rng.dirichlet(np.ones(4), n)
    p[np.arange(n), y] += 0.3
    p = np.round(p / p.sum(1, keepdims=True), 2)  # ties
    yb, sb = (y == 0).astype(int), p[:, 0]
    w = rng.integers(0, 3, (2, n)).astype(float)
    mc, bi = B.multiclass_statistic(y, p)(w), B.binary_statistic(yb, sb, 0.3)(w)
    for b in range(2):
        r = np.repeat(np.arange(n), w[b].astype(int))
        pred = p.argmax(1)
        assert mc["accuracy"][b] == pytest.approx(skm.accuracy_score(y[r], pred[r]))
        assert mc["balanced_accuracy"][b] == pytest.approx(skm.balanced_accuracy_score(y[r], pred[r]))
        assert mc["macro_f1"][b] == pytest.approx(skm.f1_score(y[r], pred[r], average="macro"))
        aucs = [skm.roc_auc_score(y[r] == c, p[r, c]) for c in range(4)]
        assert mc["roc_auc_macro"][b] == pytest.approx(np.mean(aucs))
        assert bi["roc_auc"][b] == pytest.approx(skm.roc_auc_score(yb[r], sb[r]))
        assert bi["pr_auc"][b] == pytest.approx(skm.average_precision_score(yb[r], sb[r]))
        assert bi["sensitivity_at_specificity_90"][b] == pytest.approx(M.sensitivity_at_specificity(yb[r], sb[r], 0.9))
        assert bi["sensitivity_at_operating_point"][b] == pytest.approx(np.mean(sb[r][yb[r] == 1] >= 0.3))


def test_bootstrap_resamples_lesions_not_images():
    # lesion A: 3 images, all correct; lesion B: 1 image, wrong. Resampling the 2 lesions gives
    # AA (acc 1), AB/BA (3 of 4 images correct: 0.75), BB (0) with probabilities 1/4, 1/2, 1/4;
    # resampling images would also give 0.25 and 0.5.
    y = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1]] * 4)
    groups = ["A", "A", "A", "B"]
    w = B.resample_weights(groups, 4000, np.random.default_rng(0))
    assert set(np.unique(w.sum(axis=1))) <= {2.0, 4.0, 6.0}  # 2 lesions drawn: 1+1, 3+1, 3+3 images
    acc = B.multiclass_statistic(y, probs)(w)["accuracy"]
    values, counts = np.unique(np.round(acc, 6), return_counts=True)
    assert set(values) == {0.0, 0.75, 1.0}
    assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    ci = B.bootstrap(B.multiclass_statistic(y, probs), groups, n_boot=500, seed=0)["accuracy"]
    assert ci["estimate"] == pytest.approx(0.75)
    assert (ci["low"], ci["high"]) == (0.0, 1.0)
    assert ci["n_groups"] == 2


def test_bootstrap_ci_wider_when_images_of_a_lesion_agree():
    # 60 lesions x 4 identical images: the lesion bootstrap must not treat them as 240 draws
    rng = np.random.default_rng(2)
    correct = rng.random(60) < 0.7
    y = np.zeros(240, dtype=int)
    probs = np.where(np.repeat(correct, 4)[:, None], [[0.9, 0.1]], [[0.1, 0.9]])
    lesions = np.repeat(np.arange(60), 4)
    stat = B.multiclass_statistic(y, probs)
    by_lesion = B.bootstrap(stat, lesions, n_boot=1000, seed=0)["accuracy"]
    by_image = B.bootstrap(stat, np.arange(240), n_boot=1000, seed=0)["accuracy"]
    assert by_lesion["low"] <= by_lesion["estimate"] <= by_lesion["high"]
    width = lambda c: c["high"] - c["low"]  # noqa: E731
    assert width(by_lesion) > 1.6 * width(by_image)  # about 2x = sqrt(4 images per lesion)


def test_age_bands():
    assert SG.age_bands([5, 29, 30, 44.5, 45, 80, float("nan"), None], [0, 30, 45]) == [
        "0-29",
        "0-29",
        "30-44",
        "30-44",
        ">=45",
        ">=45",
        "unknown",
        "unknown",
    ]


def test_subgroup_table_flags_low_sensitivity():
    # group a: 10 positives all caught; group b: 10 positives, 5 caught; group c: 2 positives
    y01 = np.array([1] * 10 + [0] * 5 + [1] * 10 + [0] * 5 + [1, 1, 0])
    score = np.array([0.9] * 10 + [0.1] * 5 + [0.9] * 5 + [0.1] * 5 + [0.1] * 5 + [0.1, 0.1, 0.1])
    groups = ["a"] * 15 + ["b"] * 15 + ["c"] * 3
    dx_probs = np.column_stack([1 - score, score])
    t = SG.subgroup_table({"site": groups}, y01, dx_probs, y01, score, 0.5, margin=0.1, min_positives=5)
    t = t.set_index("group")
    overall = 15 / 22
    assert t.loc["a", "sensitivity"] == 1.0 and t.loc["a", "flag"] == ""
    assert t.loc["b", "sensitivity"] == 0.5 < overall - 0.1 and t.loc["b", "flag"] == "low_sensitivity"
    assert t.loc["c", "flag"] == "too_few_positives"
    assert list(t["n_images"]) == [15, 15, 3]
