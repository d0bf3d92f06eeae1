"""What the retraining flow says about a run: why it stopped (failed gates, a violated data
contract), whether the verdict must be renewed, the key metrics and the run as Markdown (the
Prefect artifact). Reads what the stages wrote; no ML here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.fsutil import read_json
from pipeline.core.layout import LAYOUT, Layout
from pipeline.evaluation import gates


def needs_forced_evaluate(verdict: dict[str, Any] | None, champion_md5: str | None, candidate_md5: str | None) -> bool:
    """Whether the last verdict was judged against another champion than the current one.

    False when there is no verdict yet (DVC runs evaluate anyway) or when the candidate *is*
    the champion (it was judged before it was packaged; judging it against itself adds nothing).
    """
    if verdict is None or candidate_md5 is None or candidate_md5 == champion_md5:
        return False
    judged_against = (verdict.get("champion") or {}).get("md5")
    return judged_against != champion_md5


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def failed_gates_message(verdict: dict[str, Any]) -> str:
    """``absolute:binary.roc_auc = 0.7100 (needs >= 0.8500); ...`` for every failing gate."""
    parts = []
    for g in verdict.get("gates") or []:
        if g.get("passed"):
            continue
        op = "<=" if g.get("direction") == "max" else ">="
        bound = g.get("threshold")
        rule = f"needs {op} {_fmt(bound)}" if bound is not None else g.get("note") or "not computable"
        if g.get("gate") == "regression" and g.get("champion_value") is not None:
            rule += f", champion {_fmt(g['champion_value'])} - margin {g.get('margin')}"
        if g.get("note") and bound is not None:
            rule += f"; {g['note']}"
        parts.append(f"{g.get('gate')}:{g.get('metric')} = {_fmt(g.get('value'))} ({rule})")
    return "; ".join(parts) or ", ".join(verdict.get("failed") or []) or "verdict not passed"


def validation_failure_message(root: Path, started: float) -> str | None:
    """The failed data-contract checks of this run, or None if validate failed otherwise."""
    reports = Layout(root).reports("validation")
    path = reports / "checks.json"
    checks = read_json(path)
    if checks is None or checks.get("passed", True) or path.stat().st_mtime < started - 1:
        return None
    failed = [c for c in checks.get("checks") or [] if not c.get("passed", True)]
    items = []
    for c in failed[:5]:
        ex = f" e.g. {c['examples'][0]}" if c.get("examples") else ""
        items.append(f"{c.get('description') or c.get('name')} ({c.get('failures', '?')} failure(s)){ex}")
    more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
    return (
        f"Data contract violated: {len(failed)} of {len(checks.get('checks') or [])} checks failed: "
        + "; ".join(items)
        + more
        + f". Nothing downstream ran. See {LAYOUT.reports('validation') / 'report.md'} "
        "for every failed check with example rows and files."
    )


def key_metrics(metrics_doc: dict[str, Any] | None) -> dict[str, float]:
    """The key metrics of the evaluate stage's DVC metrics file (which holds exactly those:
    :data:`pipeline.evaluation.summary.KEY_METRICS`), flat, in order."""
    return {k: v for k, v in gates.flatten(metrics_doc or {}).items() if k != "gates_passed"}


def summary_markdown(summary: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    """The run as markdown: outcome, stages, gate table, key metrics."""
    lines = [f"# lesionflow retraining: {summary['state']}", "", summary.get("message") or "", ""]
    lines += ["| stage | result | seconds |", "|---|---|---:|"]
    for s in summary["stages"]:
        result = (
            s.get("error")
            and "**failed**"
            or (
                "ran (forced)"
                if s.get("forced") and s.get("ran")
                else "ran"
                if s.get("ran")
                else "up to date (skipped)"
            )
        )
        lines.append(f"| {s['stage']} | {result} | {s.get('seconds', '')} |")
    lines += [
        "",
        f"Champion before: `{summary.get('champion_before') or 'none'}`; "
        f"after: `{summary.get('champion_after') or 'none'}`"
        + (f"; bento `{summary['bento']}`" if summary.get("bento") else ""),
    ]
    if verdict is not None:
        lines += ["", "## Gates", "", gates.verdict_markdown(verdict)]
    if summary.get("metrics"):
        lines += ["## Key test metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in summary["metrics"].items()]
    return "\n".join(lines) + "\n"
