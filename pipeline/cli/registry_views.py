"""``lesionflow trace`` and the champion and gate tables other commands print."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from pipeline.cli.base import DISCLAIMER, app, fail, out, safe, show


def print_champion() -> dict[str, Any] | None:
    """One line on the champion (or that there is none) and one on its Bento."""
    from pipeline.registry import bento as bentos
    from pipeline.registry import champions

    champ = champions.champion()
    if champ is None:
        out.print("Champion: [yellow]none yet[/] (no model has passed the gates)")
        return None
    labels = champ["labels"]
    out.print(
        f"Champion: [bold]{champ['tag']}[/] (packaged {champ['created_at']}; data md5 "
        f"{labels.get('data_md5')}; git {str(labels.get('git_commit'))[:12]}; threshold "
        f"{labels.get('threshold')})"
    )
    last = champions.timeline()[-1]
    if last["event"] == "rollback":
        why = f"{safe(last.get('by'))}: {safe(last.get('reason'))}"
        out.print(f"  restored by rollback {last['at']:%Y-%m-%d %H:%M} UTC by {why} (lesionflow history)")
    bento = bentos.latest_bento()
    out.print(f"Bento: {bento or 'none built'}" + ("   (lesionflow serve)" if bento else ""))
    return champ


def print_gates(verdict: dict[str, Any], title: str) -> None:
    """The gate table of a verdict and the verdict itself."""
    t = Table("gate", "metric", "value", "rule", "champion", "result", title=title)
    for g in verdict.get("gates") or []:
        op = "<=" if g.get("direction") == "max" else ">="
        rule = f"{op} {show(g.get('threshold'))}" if g.get("threshold") is not None else (g.get("note") or "")
        t.add_row(
            g.get("gate", ""),
            g.get("metric", ""),
            show(g.get("value")),
            rule,
            show(g.get("champion_value")),
            "pass" if g.get("passed") else "[bold red]FAIL[/]",
        )
    out.print(t)
    passed = verdict.get("passed")
    out.print(
        f"Verdict: [bold {'green' if passed else 'red'}]{'PASSED' if passed else 'FAILED'}[/]"
        + (f" ({', '.join(verdict.get('failed') or [])})" if not passed else "")
        + (f"  {verdict['note']}" if verdict.get("note") else "")
    )


def _print_metrics(d: dict[str, Any]) -> None:
    """The packaged test metrics with their 95 % CIs (from the package's confidence record)."""
    from pipeline.evaluation import gates

    ci = gates.flatten(d.get("confidence") or {})
    t = Table("metric", "value", "95% CI", title="Test metrics")
    for k, v in gates.flatten(d.get("metrics") or {}).items():
        low, high = ci.get(f"{k}.low"), ci.get(f"{k}.high")
        t.add_row(k, show(v), f"{show(low)} - {show(high)}" if low is not None else "")
    out.print(t)


def _print_provenance(d: dict[str, Any]) -> None:
    """Params, DVC stage hashes, the commands restoring the code and data, and notes."""
    import yaml

    out.print("[bold]Params[/] (params.yaml at packaging time):")
    out.print(yaml.safe_dump(d.get("params") or {}, sort_keys=False, default_flow_style=None).rstrip(), markup=False)
    if d.get("dvc_lock"):
        out.print("[bold]DVC stage hashes[/] (dvc.lock):")
        for stage, entry in d["dvc_lock"].items():
            outs = ", ".join(f"{p}={str(m)[:12]}" for p, m in (entry.get("outs") or {}).items())
            out.print(f"  {stage}: {outs}", markup=False)
    out.print("[bold]Restore its code and data[/] (in a clone of the repository):")
    for cmd in d.get("restore") or []:
        out.print(f"  {cmd}", markup=False)
    for note in d.get("notes") or []:
        out.print(f"[yellow]note:[/] {note}")


@app.command()
def trace(
    tag: str = typer.Argument(
        ..., help="A model tag (lesionflow-classifier:VERSION) or a Bento tag (lesionflow:VERSION)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the full record as JSON."),
) -> None:
    """Trace a model or Bento: data md5, git commit, params, metrics, gates, restore commands."""
    from pipeline.registry.store import RegistryError
    from pipeline.registry.trace import describe

    try:
        d = describe(tag)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    if as_json:
        out.print_json(json.dumps(d, default=str))
        return
    model = d.get("model") or {}
    dirty = "  [yellow](working tree was dirty)[/]" if d.get("git_dirty") else ""
    out.print(f"[bold]{d['tag']}[/]" + (f"  (in bento {d['bento_tag']})" if d.get("bento_tag") else ""))
    out.print(f"  packaged:    {d.get('created_at')}   store path: {d.get('path')}")
    out.print(f"  data md5:    [bold]{d.get('data_md5')}[/]   ({(d.get('data') or {}).get('nfiles')} files, data.dvc)")
    out.print(f"  git commit:  [bold]{d.get('git_commit')}[/]{dirty}")
    out.print(f"  model md5:   {d.get('model_md5')}   threshold: {show(d.get('threshold'))}")
    out.print(
        f"  model:       {model.get('backbone')} at {model.get('input_size')}, target {model.get('target_level')}"
    )
    _print_metrics(d)
    if d.get("gates"):
        print_gates(d["gates"], "Gate verdict")
    print_external(d.get("external_validations") or [])
    if d.get("sites"):
        print_sites(d["sites"], "Sites (lesionflow site add)")
    _print_drift_checks(d.get("drift_checks") or [])
    _print_champion_history(d["tag"])
    _print_provenance(d)


def _print_champion_history(tag: str) -> None:
    """When and why this model was the champion (packaged, rolled back to)."""
    from pipeline.registry.history import history

    rows = history()
    mine = [r for r in rows if r["tag"] == tag]
    if not mine:
        return
    state = "the current champion" if rows[-1]["tag"] == tag else "not the champion now"
    events = [
        f"{r['event']} {r['at']}" + (f" by {safe(r['by'])}: {safe(r['reason'])}" if r["event"] == "rollback" else "")
        for r in mine
    ]
    out.print(f"  champion:    {state}; " + "; ".join(events))


def _print_drift_checks(records: list[dict[str, Any]]) -> None:
    """The drift checks run against the model (``lesionflow monitor``, the monitoring flow)."""
    if not records:
        return
    title = "Drift checks run against it (coverage: the log's records of the answers)"
    t = Table("report", "when", "source", "images", "coverage", "decision", title=title)
    for r in records[-10:]:
        cov = (r.get("coverage") or {}).get("record_coverage")
        t.add_row(
            safe(r.get("report")),
            str(r.get("created_at")),
            safe((r.get("source") or {}).get("kind")),
            str(r.get("n_current")),
            show(cov, 3),
            safe(r.get("decision")),
        )
    out.print(t)
    if len(records) > 10:
        out.print(f"  ({len(records) - 10} earlier drift checks: lesionflow trace TAG --json)")


def print_external(records: list[dict[str, Any]]) -> None:
    """The external validations recorded with a model (``lesionflow validate-external --record``)."""
    if not records:
        return
    t = Table(
        "name", "when", "images", "ROC-AUC", "sensitivity", "specificity", "OOD flagged", title="External validations"
    )
    for r in records:
        b, at = (r.get("metrics") or {}).get("binary") or {}, r.get("model_threshold") or {}
        flagged = r.get("ood_flagged_share")
        t.add_row(
            safe(r.get("name")),
            str(r.get("created_at")),
            str(r.get("n_images")),
            show(b.get("roc_auc"), 3),
            show(at.get("sensitivity"), 3),
            show(at.get("specificity"), 3),
            "-" if flagged is None else f"{100 * flagged:.1f}%",
        )
    out.print(t)


def print_sites(records: list[dict[str, Any]], title: str = "Sites") -> None:
    """A table of site records (``lesionflow site list`` and ``lesionflow trace``)."""
    t = Table(
        "site",
        "threshold",
        "interval",
        "sensitivity",
        "specificity",
        "malignant",
        "images",
        "decides",
        "recorded",
        title=safe(title),
        caption=DISCLAIMER,
    )
    for r in records:
        lo, hi = r.get("threshold_interval") or (None, None)
        t.add_row(
            safe(r.get("name")),
            show(r.get("threshold")),
            f"{show(lo)} - {show(hi)}",
            show(r.get("sensitivity"), 3),
            show(r.get("specificity"), 3),
            str(r.get("n_malignant")),
            str(r.get("n_images")),
            "yes" if r.get("suitable") else safe(f"no: {r.get('reason')}"),
            str(r.get("created_at")),
        )
    out.print(t)
