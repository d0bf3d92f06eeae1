"""pipeline.evaluation.gates: absolute thresholds, no regression vs the champion, readable verdict."""

from __future__ import annotations

from pipeline.evaluation.gates import GateSpec, evaluate_gates, flatten, verdict_markdown

SPEC = GateSpec(
    absolute={"binary.roc_auc": 0.85, "dx.balanced_accuracy": 0.5, "binary.ece": 0.1},
    regression_margin={"binary.roc_auc": 0.01, "dx.balanced_accuracy": 0.02},
    lower_is_better=("binary.ece",),
)
GOOD = {"binary.roc_auc": 0.90, "dx.balanced_accuracy": 0.60, "binary.ece": 0.05}


def test_flatten():
    assert flatten({"binary": {"roc_auc": 0.9, "flag": True, "name": "x"}, "n": 3}) == {"binary.roc_auc": 0.9, "n": 3.0}


def test_passes():
    champion = {"binary.roc_auc": 0.905, "dx.balanced_accuracy": 0.61, "binary.ece": 0.04}
    v = evaluate_gates(GOOD, SPEC, champion)
    assert v["passed"] and v["failed"] == [] and v["champion_present"]
    assert len(v["gates"]) == 5 and all(g["passed"] for g in v["gates"])
    reg = [g for g in v["gates"] if g["gate"] == "regression" and g["metric"] == "binary.roc_auc"][0]
    assert reg["champion_value"] == 0.905 and reg["threshold"] == 0.905 - 0.01


def test_fails_on_absolute_threshold_and_names_the_metric():
    v = evaluate_gates({**GOOD, "dx.balanced_accuracy": 0.45}, SPEC)
    assert not v["passed"]
    assert v["failed"] == ["absolute:dx.balanced_accuracy"]
    bad = [g for g in v["gates"] if not g["passed"]][0]
    assert (bad["metric"], bad["value"], bad["threshold"]) == ("dx.balanced_accuracy", 0.45, 0.5)
    assert "dx.balanced_accuracy" in verdict_markdown(v) and "FAIL" in verdict_markdown(v)


def test_lower_is_better_metric_fails_above_its_maximum():
    v = evaluate_gates({**GOOD, "binary.ece": 0.2}, SPEC)
    assert v["failed"] == ["absolute:binary.ece"]


def test_fails_on_regression_vs_champion():
    # 0.88 clears the absolute 0.85 but falls 0.03 below the champion's 0.91 (margin 0.01)
    champion = {"binary.roc_auc": 0.91, "dx.balanced_accuracy": 0.60, "binary.ece": 0.05}
    v = evaluate_gates({**GOOD, "binary.roc_auc": 0.88}, SPEC, champion)
    assert not v["passed"]
    assert v["failed"] == ["regression:binary.roc_auc"]
    assert "regression" in verdict_markdown(v) and "`binary.roc_auc`" in verdict_markdown(v)


def test_passes_with_no_champion_only_absolute_gates():
    v = evaluate_gates(GOOD, SPEC, champion=None)
    assert v["passed"] and not v["champion_present"]
    assert {g["gate"] for g in v["gates"]} == {"absolute"}
    assert "no champion" in v["note"]


def test_missing_metric_fails_its_gate():
    v = evaluate_gates({"binary.roc_auc": 0.9}, SPEC)
    assert "absolute:dx.balanced_accuracy" in v["failed"]
    assert any(g["note"] == "metric not computed" for g in v["gates"])


def test_nan_metric_is_not_a_pass():
    v = evaluate_gates({**GOOD, "binary.roc_auc": float("nan")}, SPEC)
    assert v["failed"] == ["absolute:binary.roc_auc"]


def test_evaluate_params_reject_bad_gates_with_the_key_named():
    import pytest

    from pipeline.core import params

    ok = params.from_dict(params.EvaluateParams, {"gates": {"absolute": {"binary.roc_auc": 0.8}}}, "evaluate")
    assert ok.gates.absolute == {"binary.roc_auc": 0.8}
    with pytest.raises(params.ParamsError, match=r"evaluate\.gates\.absolute\.auc: metric names are"):
        params.from_dict(params.EvaluateParams, {"gates": {"absolute": {"auc": 0.8}}}, "evaluate")
    with pytest.raises(
        params.ParamsError, match=r"evaluate\.gates\.regression_margin\.dx\.accuracy: margin must be >= 0"
    ):
        params.from_dict(params.EvaluateParams, {"gates": {"regression_margin": {"dx.accuracy": -0.1}}}, "evaluate")
    with pytest.raises(params.ParamsError, match=r"evaluate\.target_sensitivity"):
        params.from_dict(params.EvaluateParams, {"target_sensitivity": 1.5}, "evaluate")
    with pytest.raises(params.ParamsError, match=r"evaluate\.age_bands"):
        params.from_dict(params.EvaluateParams, {"age_bands": [0, 50, 30]}, "evaluate")
