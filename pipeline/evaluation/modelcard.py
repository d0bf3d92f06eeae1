"""The model card: Markdown rendered from ``templates/model_card.md.j2`` (the prose and layout live
in the template; the numbers are computed by the evaluation) and the same as a standalone HTML
page (``templates/model_card.html.j2`` + ``model_card.css``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.reporting import fmt, frame_table, render_template
from pipeline.core.taxonomy import DIAGNOSIS_NAMES
from pipeline.model import ood

TEMPLATES = Path(__file__).resolve().parent / "templates"
LEVEL_TITLES = {"dx": "7 diagnoses", "risk": "3 risk classes", "binary": "benign vs malignant"}


@dataclass
class CardInputs:
    """What the model card reports (all computed by the evaluate stage)."""

    config: Mapping[str, Any]  # the model's config.json
    full: Mapping[str, Any]  # summary.level_metrics of the test split
    model_dir: str
    model_md5: str
    operating_point: Mapping[str, Any]
    lineage: Mapping[str, Any]
    sizes: Mapping[str, Mapping[str, int]]
    test_distribution: Mapping[str, int]
    confidence: float
    n_boot: int
    verdict: Mapping[str, Any]
    verdict_md: str
    baselines: pd.DataFrame
    eda_note: str
    champion: Mapping[str, Any] | None
    flat: Mapping[str, float]
    subgroups: pd.DataFrame
    subgroup_margin: float
    subgroup_min_positives: int
    gradcam: Mapping[str, str]
    attribution: Mapping[str, float] | None
    calibration: Mapping[str, Any]  # trust.calibration_effect
    ood: Mapping[str, Any] | None  # trust.ood_effect
    retrieval: Mapping[str, Any] | None = None  # retrieval.knn_evidence
    retrieval_note: str = ""


def _fmt3(value: Any, missing: str = "-") -> str:
    return fmt(value, 3, missing)


def _ci(rep: Mapping[str, Any], key: str, value: Any = None) -> str:
    """``value [low, high]`` of a metric with a bootstrap CI, else the value alone."""
    value = rep.get(key) if value is None else value
    ci = (rep.get("ci") or {}).get(key)
    if ci and ci.get("low") is not None:
        return f"{_fmt3(value)} [{_fmt3(ci['low'])}, {_fmt3(ci['high'])}]"
    return _fmt3(value)


def model_card(c: CardInputs) -> str:
    """The model card as Markdown."""
    flagged = c.subgroups[c.subgroups["flag"] == "low_sensitivity"] if len(c.subgroups) else c.subgroups
    return render_template(
        TEMPLATES,
        "model_card.md.j2",
        arch=c.config.get("architecture", {}),
        config=c.config,
        full=c.full,
        op=c.operating_point,
        lineage=c.lineage,
        sizes=c.sizes,
        model_dir=c.model_dir,
        model_md5=c.model_md5,
        test_distribution=", ".join(f"{k} {v}" for k, v in c.test_distribution.items()),
        confidence=c.confidence,
        n_boot=c.n_boot,
        verdict=c.verdict,
        verdict_md=c.verdict_md,
        level_titles=LEVEL_TITLES,
        diagnosis_names=DIAGNOSIS_NAMES,
        fmt=_fmt3,
        ci=_ci,
        baselines_table=frame_table(c.baselines),
        eda_note=c.eda_note,
        champion=c.champion,
        flat=c.flat,
        champion_metrics=sorted(set(c.flat) & set(c.champion["flat"])) if c.champion else [],
        subgroup_margin=c.subgroup_margin,
        subgroup_min_positives=c.subgroup_min_positives,
        subgroups_table=frame_table(c.subgroups),
        flagged=", ".join(f"{r.attribute}={r.group}" for r in flagged.itertuples()),
        gradcam=c.gradcam,
        attribution=c.attribution,
        calibration=c.calibration,
        temperature=(c.config.get("calibration") or {}).get("temperature"),
        ood=c.ood,
        ood_config=c.config.get("ood"),
        ood_description=ood.DESCRIPTIONS.get((c.config.get("ood") or {}).get("method")),
        quality_config=c.config.get("quality"),
        retrieval=c.retrieval,
        retrieval_note=c.retrieval_note,
        train_lineage=c.config.get("lineage"),
        evaluate_params=json.dumps(c.lineage["params"].get("evaluate", {}), sort_keys=True)[:2000],
    )


def render_html(md_text: str, title: str) -> str:
    """A Markdown document as a standalone HTML page (tables, anchors, the card's stylesheet)."""
    import markdown

    body = markdown.markdown(md_text, extensions=["tables", "toc"])
    return render_template(
        TEMPLATES, "model_card.html.j2", title=title, body=body, css=(TEMPLATES / "model_card.css").read_text()
    )
