"""The drift check (Evidently 0.7): compare a current batch with the reference profile.

:func:`run_check` runs Evidently reports (``evidently.Report``, presets from ``evidently.presets``;
never the legacy API): data drift over the feature table (image statistics + metadata),
prediction drift (predicted class, probabilities), embedding drift (share of drifted projected
components, or Evidently's domain classifier) and, when the current batch has labels,
classification quality against the reference. Each is saved as HTML + JSON under
``reports/monitoring/<UTC timestamp>/`` with ``summary.json`` / ``summary.md``: drifted columns,
drift share, embedding drift, the decision and its reason (:mod:`pipeline.monitoring.decision`).
Thresholds come from the ``monitor`` section of params.yaml; below ``min_batch_size`` images the
decision is ``not_enough_data``. Evidently is imported lazily.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import lineage
from pipeline.core.fsutil import atomic_write_text, staged_dir, write_json
from pipeline.core.params import MonitorParams, to_dict
from pipeline.monitoring import labelled
from pipeline.monitoring.decision import DRIFT, NO_DRIFT, NOT_ENOUGH_DATA, summary_markdown
from pipeline.monitoring.inferencelog import HAS_STATISTICS
from pipeline.monitoring.profile import Reference

SUMMARY_FILE = "summary.json"
MISSING = "(missing)"


def _prepare(frame: pd.DataFrame, num: list[str], cat: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(index=range(len(frame)))
    for c in num:
        out[c] = pd.to_numeric(frame[c], errors="coerce").astype(float).to_numpy()
    for c in cat:
        out[c] = frame[c].astype(object).where(frame[c].notna(), MISSING).astype(str).to_numpy()
    return out


def _usable(ref: pd.DataFrame, cur: pd.DataFrame, cols: Sequence[str]) -> tuple[list[str], list[str]]:
    """Columns present and not entirely missing in both frames; and the skipped ones."""
    ok, skipped = [], []
    for c in cols:
        if c in ref and c in cur and ref[c].notna().any() and cur[c].notna().any():
            ok.append(c)
        else:
            skipped.append(c)
    return ok, skipped


@contextlib.contextmanager
def _table_only_rendering():
    """Inside a ``DataDriftPreset`` the per-column ``ValueDrift`` widgets are computed and then
    discarded (the preset renders its own drift table); building those plotly figures is about half
    the report's time. Skip them while the preset runs (the values and tests are unaffected)."""
    try:
        from evidently.metrics.column_statistics import ValueDriftCalculation
    except ImportError:  # another Evidently layout: render as usual
        yield
        return
    original = ValueDriftCalculation.__dict__.get("_render")
    if original is None:
        yield
        return
    ValueDriftCalculation._render = lambda self, *args, **kwargs: []  # type: ignore[method-assign]
    try:
        yield
    finally:
        ValueDriftCalculation._render = original  # type: ignore[method-assign]


def _datasets(ref: pd.DataFrame, cur: pd.DataFrame, num: list[str], cat: list[str]) -> tuple[Any, Any]:
    from evidently import DataDefinition, Dataset

    dd = DataDefinition(numerical_columns=num, categorical_columns=cat)
    return (
        Dataset.from_pandas(_prepare(ref, num, cat), data_definition=dd),
        Dataset.from_pandas(_prepare(cur, num, cat), data_definition=dd),
    )


def _drift_metrics(num: list[str], cat: list[str], p: Any, drift_share: float, html: bool) -> list[Any]:
    """The Evidently metrics of a drift report: the ``DataDriftPreset`` (with its drift table), or
    without plots the same per-column ``ValueDrift`` metrics and the drifted-columns count."""
    from evidently.metrics import DriftedColumnsCount, ValueDrift
    from evidently.presets import DataDriftPreset

    common = {
        "columns": num + cat,
        "drift_share": drift_share,
        "num_method": p.num_method,
        "cat_method": p.cat_method,
        "num_threshold": p.num_threshold,
        "cat_threshold": p.cat_threshold,
    }
    if html:
        return [DataDriftPreset(**common)]
    return (
        [DriftedColumnsCount(**common)]
        + [ValueDrift(column=x, method=p.num_method, threshold=p.num_threshold) for x in num]
        + [ValueDrift(column=x, method=p.cat_method, threshold=p.cat_threshold) for x in cat]
    )


def drift_report(
    ref: pd.DataFrame,
    cur: pd.DataFrame,
    num: list[str],
    cat: list[str],
    p: Any,
    drift_share: float,
    html: bool = True,
) -> tuple[Any, dict[str, dict[str, Any]], float]:
    """Evidently data drift over ``num + cat``: (snapshot, per-column results, drift share).

    Per column: Evidently's score, method, threshold and verdict, plus an effect size
    (:func:`effect_size`) used to rank the drifted columns; a numerical column counts as drifted
    only when it also moved by ``p.min_effect`` (statistically *and* practically significant).
    ``html=True``: the ``DataDriftPreset`` (its drift table is the report a person reads);
    ``html=False``: the same verdicts without any plots, several times faster."""
    from evidently import Report

    cols = num + cat
    r, c = _datasets(ref, cur, num, cat)
    with _table_only_rendering(), np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        snap = Report(_drift_metrics(num, cat, p, drift_share, html), include_tests=True).run(
            reference_data=r, current_data=c
        )
    res = column_results(snap.dict())
    for col in (col for col in cols if col in res):
        res[col]["effect"] = effect_size(ref[col], cur[col], col in num)
        res[col]["evidently_drifted"] = res[col]["drifted"]
        if col in num:
            res[col]["drifted"] = bool(
                res[col]["drifted"] and (res[col]["effect"] or 0.0) >= getattr(p, "min_effect", 0.0)
            )
    return snap, res, share_of(res, cols)


def effect_size(ref: pd.Series, cur: pd.Series, numerical: bool) -> float | None:
    """How far the current distribution moved: for a numerical column the Wasserstein distance in
    units of the reference's standard deviation; for a categorical one the total variation distance."""
    if numerical:
        a = pd.to_numeric(ref, errors="coerce").dropna().to_numpy(dtype=float)
        b = pd.to_numeric(cur, errors="coerce").dropna().to_numpy(dtype=float)
        if not len(a) or not len(b):
            return None
        from scipy.stats import wasserstein_distance

        sd = float(a.std()) or 1.0
        return round(float(wasserstein_distance(a, b)) / sd, 4)
    pa = ref.astype(str).value_counts(normalize=True)
    pb = cur.astype(str).value_counts(normalize=True)
    keys = pa.index.union(pb.index)
    return round(0.5 * float((pa.reindex(keys, fill_value=0) - pb.reindex(keys, fill_value=0)).abs().sum()), 4)


def column_results(snapshot_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per column: Evidently's drift score, method, threshold and verdict (from its tests)."""
    status = {}
    for t in snapshot_dict.get("tests") or []:
        mc = t.get("metric_config") or {}
        if (mc.get("params") or {}).get("type") == "evidently:metric_v2:ValueDrift":
            status[mc.get("metric_id")] = t.get("status") == "FAIL"
    out: dict[str, dict[str, Any]] = {}
    for m in snapshot_dict.get("metrics") or []:
        cfg = m.get("config") or {}
        if cfg.get("type") != "evidently:metric_v2:ValueDrift":
            continue
        score = m.get("value")
        out[cfg["column"]] = {
            "score": None if score is None or (isinstance(score, float) and not math.isfinite(score)) else float(score),
            "method": cfg.get("method"),
            "threshold": cfg.get("threshold"),
            "drifted": bool(status.get(m.get("id"), False)),
        }
    return out


def share_of(results: Mapping[str, Mapping[str, Any]], cols: Sequence[str]) -> float:
    return sum(bool(results.get(c, {}).get("drifted")) for c in cols) / max(1, len(cols))


def _ranked(results: Mapping[str, Mapping[str, Any]], cols: Sequence[str]) -> list[str]:
    """Drifted columns, the largest effect size first."""
    drifted = [c for c in cols if results.get(c, {}).get("drifted")]
    return sorted(drifted, key=lambda c: -(results[c].get("effect") or 0.0))


def _stamp_dir(root: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out, k = root / stamp, 1
    while out.exists():
        out, k = root / f"{stamp}-{k}", k + 1
    return out


def _summary_head(
    reference: Reference,
    current: pd.DataFrame,
    p: MonitorParams,
    source: Mapping[str, Any],
    skipped_images: Sequence[str],
) -> dict[str, Any]:
    """What every check records before any report: the batch, the reference and the thresholds."""
    n_cur = int(len(current))
    summary: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": dict(source),
        "n_current": n_cur,
        "n_reference": int(len(reference.frame)),
        "min_batch_size": int(p.min_batch_size),
        "reference": {
            "path": str(reference.path),
            "model": reference.schema.get("model"),
            "data": ((reference.schema.get("lineage") or {}).get("data") or {}).get("md5"),
        },
        "thresholds": {
            k: getattr(p, k)
            for k in (
                "num_method",
                "num_threshold",
                "cat_method",
                "cat_threshold",
                "min_effect",
                "drift_share",
                "embedding_method",
                "embedding_drift_share",
                "embedding_auc_threshold",
            )
        }
        | {"key_features": list(p.key_features)},
        "skipped_images": list(skipped_images),
        "reports": {},
    }
    if "model_tag" in current and n_cur:
        summary["model_tags"] = sorted(map(str, current["model_tag"].dropna().unique()))
    if refused := refusals(current):
        summary["refused"] = refused
    if current.attrs.get("coverage") is not None:  # a window of the inference log
        summary["coverage"] = dict(current.attrs["coverage"])
        if warning := coverage_warning(summary["coverage"]):
            summary["coverage_warning"] = warning
    return summary


def refusals(current: pd.DataFrame) -> dict[str, Any] | None:
    """How many of the checked answers got no risk estimate, and why: per image-quality reason
    (``quality``; an answer may have several; absent when no row was checked: a model without
    checks) and out of distribution (``ood``); None when the rows carry neither verdict."""
    from pipeline.core.predictions import IN_DISTRIBUTION, QUALITY, split_reasons
    from pipeline.model import quality

    out: dict[str, Any] = {}
    if QUALITY in current and current[QUALITY].notna().any():
        reasons = [split_reasons(v) for v in current[QUALITY]]
        out["quality"] = quality.counts(reasons)
        out["quality_refused"] = sum(bool(r) for r in reasons)
    if IN_DISTRIBUTION in current:
        out["ood"] = int((current[IN_DISTRIBUTION].dropna().astype(bool) == False).sum())  # noqa: E712
    return out or None


def coverage_warning(coverage: Mapping[str, Any], minimum: float = 0.99) -> str | None:
    """What to say when a log window holds fewer than ``minimum`` of the answers the service gave,
    or of their image statistics (:func:`pipeline.monitoring.inferencelog.coverage`); None when
    both are above it (or unknown)."""
    said = []
    rec, stats = coverage.get("record_coverage"), coverage.get("statistics_coverage")
    if rec is not None and rec < minimum:
        said.append(
            f"the window holds {coverage['records']} answer records of {coverage['answered']} answers the "
            f"service gave ({rec:.1%}; {coverage.get('dropped', 0)} dropped, {coverage.get('failed', 0)} failed)"
        )
    if stats is not None and stats < minimum:
        said.append(
            f"only {coverage['with_statistics']} of {coverage['records']} answers have image statistics "
            f"({stats:.1%}): the drift of the image statistics is measured on those"
        )
    return ("coverage below " + f"{minimum:.0%}: " + "; ".join(said)) if said else None


def run_check(
    reference: Reference,
    current: pd.DataFrame,
    p: MonitorParams,
    out_root: Path | str,
    source: Mapping[str, Any],
    skipped_images: Sequence[str] = (),
    html: bool = True,
) -> dict[str, Any]:
    """Run the Evidently reports and the decision; write everything under
    ``out_root/<UTC timestamp>/`` (HTML + JSON per report, ``summary.json``, ``summary.md``);
    return the summary (its ``report_dir`` says where). ``html=False`` writes the JSON results and
    the summary only (same decision, no plots: for tests and batch back-fills)."""
    t0 = time.perf_counter()
    final = _stamp_dir(Path(out_root))
    summary = _summary_head(reference, current, p, source, skipped_images)
    with staged_dir(final) as stage:
        if summary["n_current"] < p.min_batch_size:
            summary.update(
                decision=NOT_ENOUGH_DATA,
                drift=None,
                reason=f"not enough data: {summary['n_current']} current image(s), fewer than "
                f"min_batch_size {p.min_batch_size}; no verdict",
            )
        else:
            _evidently_reports(reference, current, p, stage, summary, html)
        summary["lineage"] = lineage.lineage(params={"monitor": to_dict(p)})
        summary["elapsed_s"] = round(time.perf_counter() - t0, 2)
        summary["report_dir"] = str(final)
        write_json(stage / SUMMARY_FILE, summary)
        atomic_write_text(stage / "summary.md", summary_markdown(summary))
    return summary


def _feature_drift(
    reference: Reference, current: pd.DataFrame, p: MonitorParams, stage: Path, summary: dict[str, Any], html: bool
) -> tuple[list[str], list[str], float]:
    """1. Data drift over the feature table (image statistics + metadata); returns (the feature
    columns checked, the drifted ones by effect size, the drifted share)."""
    cols, ref = reference.columns, reference.frame
    if HAS_STATISTICS in current:  # log answers whose statistics were skipped under load: not NaN drift
        current = current[current[HAS_STATISTICS].astype(bool)]
    num, skip_n = _usable(ref, current, cols["stat_numeric"] + cols["metadata_numeric"])
    cat, skip_c = _usable(ref, current, cols["stat_categorical"] + cols["metadata_categorical"])
    snap, res, share = drift_report(ref, current, num, cat, p, p.drift_share, html)
    _save(snap, stage, "data_drift", summary, html)
    feats = num + cat
    drifted = _ranked(res, feats)
    key_present = [k for k in p.key_features if k in feats]
    summary.update(
        n_features=len(feats),
        drift_share=round(share, 4),
        drifted_columns=drifted,
        key_features_checked=key_present,
        key_features_drifted=[k for k in key_present if res.get(k, {}).get("drifted")],
        columns_skipped=sorted(skip_n + skip_c),
        column_drift={c: res[c] for c in feats if c in res},
    )
    return feats, drifted, share


def _prediction_drift(
    reference: Reference, current: pd.DataFrame, p: MonitorParams, stage: Path, summary: dict[str, Any], html: bool
) -> None:
    """2. Prediction drift: predicted class, class probabilities, malignancy probability."""
    cols, ref = reference.columns, reference.frame
    pnum, _ = _usable(ref, current, cols["prediction_numeric"])
    pcat, _ = _usable(ref, current, cols["prediction_categorical"])
    if not (pnum or pcat):
        return
    snap, pres, pshare = drift_report(ref, current, pnum, pcat, p, p.drift_share, html)
    _save(snap, stage, "prediction_drift", summary, html)
    pred = cols["prediction_categorical"][0]
    summary["prediction_drift"] = {
        "drift_share": round(pshare, 4),
        "drifted_columns": _ranked(pres, pnum + pcat),
        "columns": pres,
        "class_distribution": {"reference": _distribution(ref.get(pred)), "current": _distribution(current.get(pred))},
    }


def _decide(summary: dict[str, Any], feats: list[str], drifted: list[str], share: float, p: MonitorParams) -> None:
    """The decision: drift when the drifted share reaches ``drift_share``, a key feature drifts or
    the embeddings drift."""
    reasons = []
    if share >= p.drift_share:
        reasons.append(f"{len(drifted)} of {len(feats)} feature columns drifted (share {share:.2f} >= {p.drift_share})")
    if summary["key_features_drifted"]:
        reasons.append(f"key feature(s) drifted: {', '.join(summary['key_features_drifted'])}")
    ed = summary["embedding_drift"]
    if ed and ed["drifted"]:
        reasons.append(f"embeddings drifted ({ed['method']}: {ed['score']:.3f} >= {ed['threshold']})")
    top = ", ".join(drifted[:8]) if drifted else "none"
    summary.update(
        decision=DRIFT if reasons else NO_DRIFT,
        drift=bool(reasons),
        reason=("drift: " + "; ".join(reasons) + f". Most drifted: {top}")
        if reasons
        else (
            f"no drift: {len(drifted)} of {len(feats)} feature columns drifted (share {share:.2f} < "
            f"{p.drift_share}), no key feature drifted"
            + (f", embeddings {ed['method']} {ed['score']:.3f} < {ed['threshold']}" if ed else "")
        ),
    )


def _evidently_reports(
    reference: Reference,
    current: pd.DataFrame,
    p: MonitorParams,
    stage: Path,
    summary: dict[str, Any],
    html: bool = True,
) -> None:
    """Every report of a check with enough data, then the decision."""
    feats, drifted, share = _feature_drift(reference, current, p, stage, summary, html)
    _prediction_drift(reference, current, p, stage, summary, html)
    emb, _ = _usable(reference.frame, current, reference.columns["embedding"])
    summary["embedding_drift"] = (
        _embedding_drift(reference.frame, current, emb, p, stage, summary, html) if emb else None
    )
    label, pred = reference.columns.get("label"), reference.columns["prediction_categorical"][0]
    if label and label in current and current[label].notna().any() and pred in current:
        summary["classification"], snap = labelled.classification(reference, current)
        if snap is not None:
            _save(snap, stage, "classification", summary, html)
    _decide(summary, feats, drifted, share, p)


def _distribution(s: pd.Series | None) -> dict[str, float]:
    if s is None or not len(s):
        return {}
    return {str(k): round(float(v), 4) for k, v in s.value_counts(normalize=True).sort_index().items()}


def _save(snap: Any, stage: Path, name: str, summary: dict[str, Any], html: bool = True) -> None:
    if html:
        snap.save_html(str(stage / f"{name}.html"))
    snap.save_json(str(stage / f"{name}.json"))
    summary["reports"][name] = {"html": f"{name}.html" if html else None, "json": f"{name}.json"}


def _embedding_drift(
    ref: pd.DataFrame,
    cur: pd.DataFrame,
    emb: list[str],
    p: Any,
    stage: Path,
    summary: dict[str, Any],
    html: bool = True,
) -> dict[str, Any]:
    """Drift of the projected embeddings: the share of drifted components (``share``) or a
    domain classifier's ROC-AUC (``model``, Evidently's EmbeddingsDrift)."""
    if p.embedding_method == "share":
        snap, res, share = drift_report(ref, cur, emb, [], p, p.embedding_drift_share, html=False)
        _save(snap, stage, "embedding_drift", summary, html=False)  # 32 per-component plots help nobody
        drifted = _ranked(res, emb)
        return {
            "method": "share",
            "score": round(share, 4),
            "threshold": p.embedding_drift_share,
            "drifted": bool(share >= p.embedding_drift_share),
            "n_components": len(emb),
            "n_drifted_components": len(drifted),
            "drifted_components": drifted,
        }
    snap = _embedding_model_report(ref, cur, emb, p)
    _save(snap, stage, "embedding_drift", summary, html)
    score = float(
        next(m["value"] for m in snap.dict()["metrics"] if m["config"]["type"] == "evidently:metric_v2:EmbeddingsDrift")
    )
    return {
        "method": "model",
        "score": round(score, 4),
        "threshold": p.embedding_auc_threshold,
        "drifted": bool(score >= p.embedding_auc_threshold),
        "n_components": len(emb),
    }


def _embedding_model_report(ref: pd.DataFrame, cur: pd.DataFrame, emb: list[str], p: Any) -> Any:
    """Evidently's EmbeddingsDrift (domain classifier) on at most ``embedding_max_rows`` rows of each."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod

    n = p.embedding_max_rows
    r = ref[emb].sample(min(n, len(ref)), random_state=0) if len(ref) > n else ref[emb]
    c = cur[emb].sample(min(n, len(cur)), random_state=0) if len(cur) > n else cur[emb]
    dd = DataDefinition(numerical_columns=emb, embeddings={"embeddings": emb})
    method = ModelDriftMethod(threshold=p.embedding_auc_threshold)
    return Report([EmbeddingsDrift(embeddings_name="embeddings", drift_method=method)]).run(
        reference_data=Dataset.from_pandas(r.reset_index(drop=True).astype(float), data_definition=dd),
        current_data=Dataset.from_pandas(c.reset_index(drop=True).astype(float), data_definition=dd),
    )


# ----------------------------------------------------------------------------------------------
# people-facing summary and the retraining rule
