"""What a drift check concludes, for people and for the flow: the summary in Markdown and the
retraining rule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NOT_ENOUGH_DATA, DRIFT, NO_DRIFT = "not_enough_data", "drift", "no_drift"


def _verdict_rows(summary: Mapping[str, Any]) -> list[str]:
    """Table rows of a check that reached a verdict: drift share, key features, embeddings,
    predictions, labelled accuracy."""
    rows = [
        f"| feature drift share | {summary.get('drift_share')} (threshold {summary['thresholds']['drift_share']}, "
        f"{summary.get('n_features')} columns) |",
        f"| key features drifted | {', '.join(summary.get('key_features_drifted') or []) or 'none'} |",
    ]
    if ed := summary.get("embedding_drift"):
        rows.append(f"| embedding drift ({ed['method']}) | {ed['score']} (threshold {ed['threshold']}) |")
    if pdr := summary.get("prediction_drift"):
        rows.append(f"| prediction drift | {', '.join(pdr['drifted_columns']) or 'none'} |")
    if cl := summary.get("classification"):
        rows.append(
            f"| balanced accuracy | current {cl['current']['balanced_accuracy']} "
            f"(reference {cl['reference']['balanced_accuracy']}) |"
        )
    return rows


def _drifted_columns(summary: Mapping[str, Any]) -> list[str]:
    """How a drifted column is judged, and the most drifted columns with their effect sizes."""
    th = summary.get("thresholds") or {}
    lines = [
        "",
        f"A numerical column counts as drifted when Evidently's {th.get('num_method')} test flags it "
        f"(threshold {th.get('num_threshold')}) *and* it moved by at least {th.get('min_effect')} "
        "reference standard deviations; the HTML drift table shows Evidently's test alone.",
        "",
        "Most drifted columns (strongest first):",
        "",
    ]
    cd = summary.get("column_drift") or {}
    for c in (summary.get("drifted_columns") or [])[:15]:
        r = cd.get(c, {})
        lines.append(
            f"- `{c}`: moved {r.get('effect')} (Wasserstein / reference std, or total variation); "
            f"{r.get('method')} = {r.get('score'):.3g}, threshold {r.get('threshold')}"
            if isinstance(r.get("score"), float)
            else f"- `{c}`"
        )
    rd = summary.get("report_dir", "")
    reports = (summary.get("reports") or {}).values()
    return [*lines, "", "Reports: " + ", ".join(f"`{rd}/{v['html'] or v['json']}`" for v in reports)]


def refusals_text(refused: Mapping[str, Any]) -> str:
    """How many answers got no risk estimate and why (:func:`pipeline.monitoring.drift.refusals`),
    in one line."""
    why = [f"{r.replace('_', ' ')} {n}" for r, n in (refused.get("quality") or {}).items() if n]
    checks = ""
    if "quality_refused" in refused:
        checks = (
            f"{refused['quality_refused']} by the image-quality checks{' (' + ', '.join(why) + ')' if why else ''}; "
        )
    return f"{checks}{refused.get('ood', 0)} out of distribution"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A short markdown summary (also the Prefect artifact of the monitoring flow)."""
    d = summary.get("decision")
    head = {DRIFT: "DRIFT DETECTED", NO_DRIFT: "no drift", NOT_ENOUGH_DATA: "not enough data"}.get(d, str(d))
    src = summary.get("source") or {}
    lines = [
        f"# lesionflow drift check: {head}",
        "",
        str(summary.get("reason", "")),
        "",
        "| | |",
        "|---|---|",
        f"| source | {src.get('kind')} `{src.get('path', '')}` {src.get('window', '')} |",
        f"| current images | {summary.get('n_current')} (minimum {summary.get('min_batch_size')}) |",
        f"| reference images | {summary.get('n_reference')} |",
    ]
    if cov := summary.get("coverage"):
        answered = "unknown" if cov.get("answered") is None else cov["answered"]
        lines.append(
            f"| log coverage | {cov.get('records')} answer records of {answered} answers given; "
            f"{cov.get('with_statistics')} with image statistics |"
        )
    if refused := summary.get("refused"):
        lines.append(f"| not judged | {refusals_text(refused)} |")
    if warning := summary.get("coverage_warning"):
        lines += ["", f"**Warning**: {warning}"]
    if d != NOT_ENOUGH_DATA:
        lines += _verdict_rows(summary) + _drifted_columns(summary)
    if skipped := summary.get("skipped_images"):
        lines += ["", f"Skipped {len(skipped)} unreadable image(s): " + "; ".join(skipped[:5])]
    return "\n".join(lines) + "\n"


def retrain_decision(summary: Mapping[str, Any], data_md5: str | None, champion_data_md5: str | None) -> dict[str, Any]:
    """What the monitoring flow does after a check: ``action`` is ``none`` (no drift or not enough
    data), ``retrain`` (drift, and the workspace's data version differs from the champion's: new
    labelled data was added) or ``alert`` (drift, but no new data to retrain on)."""
    if summary.get("decision") != DRIFT:
        return {"action": "none", "reason": summary.get("reason", "")}
    if not champion_data_md5:
        return {
            "action": "alert",
            "reason": "drift confirmed but there is no packaged champion whose data version could be compared "
            "(run the retraining flow once: lesionflow run)",
        }
    if data_md5 and data_md5 != "unknown" and data_md5 != champion_data_md5:
        return {
            "action": "retrain",
            "reason": f"drift confirmed and a new data version is available (data.dvc md5 {data_md5}, "
            f"champion trained on {champion_data_md5})",
        }
    return {
        "action": "alert",
        "reason": f"drift confirmed but no new labelled data (data.dvc md5 {data_md5} = the champion's): "
        "label new images, add them as a new DVC data version (lesionflow ingest DIR --metadata CSV), then retrain",
    }
