"""Quality gates: may this model ship? Pure logic on metric values, no I/O.

Two kinds of gate, configured in ``params.yaml`` (section ``evaluate.gates``):

* **absolute**: a metric must reach a fixed threshold (``value >= minimum``; for metrics where
  lower is better, e.g. a calibration error, ``value <= maximum``);
* **regression**: a metric may not fall more than ``margin`` below the champion's value on the
  *same* test split (``value >= champion - margin``; for lower-is-better metrics
  ``value <= champion + margin``). Without a champion these gates are skipped and the verdict
  says so.

Metrics are addressed by flat dotted names such as ``binary.roc_auc`` or
``dx.balanced_accuracy`` (see :func:`flatten`). A gated metric that was not computed fails its
gate (with a note), so a typo in a gate never passes silently.

The verdict is data, never an exception: the ``evaluate`` stage always succeeds and records it,
and the flow decides what to do with ``passed: false``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GateSpec", "flatten", "evaluate_gates", "verdict_markdown"]


@dataclass(frozen=True)
class GateSpec:
    """Absolute thresholds and regression margins by metric name."""

    absolute: Mapping[str, float] = field(default_factory=dict)
    regression_margin: Mapping[str, float] = field(default_factory=dict)
    lower_is_better: tuple[str, ...] = ()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"binary": {"roc_auc": 0.9}}`` -> ``{"binary.roc_auc": 0.9}`` (numbers only)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _usable(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _absolute(metric: str, value: Any, bound: float, direction: str) -> dict[str, Any]:
    entry = {
        "gate": "absolute",
        "metric": metric,
        "direction": direction,
        "value": value if _usable(value) else None,
        "threshold": float(bound),
        "note": "",
    }
    if not _usable(value):
        return {**entry, "passed": False, "note": "metric not computed"}
    return {**entry, "passed": bool(value <= bound if direction == "max" else value >= bound)}


def _regression(metric: str, value: Any, champ: Any, margin: float, direction: str) -> dict[str, Any]:
    entry = {
        "gate": "regression",
        "metric": metric,
        "direction": direction,
        "value": value if _usable(value) else None,
        "champion_value": champ if _usable(champ) else None,
        "margin": float(margin),
        "threshold": None,
        "note": "",
    }
    if not _usable(value):
        return {**entry, "passed": False, "note": "metric not computed"}
    if not _usable(champ):
        return {**entry, "passed": True, "note": "champion lacks this metric: not compared"}
    limit = champ + margin if direction == "max" else champ - margin
    return {**entry, "threshold": limit, "passed": bool(value <= limit if direction == "max" else value >= limit)}


def evaluate_gates(
    metrics: Mapping[str, float],
    spec: GateSpec,
    champion: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Check ``metrics`` (flat names -> values) against ``spec`` and the ``champion``'s metrics.

    Returns ``{"passed", "failed": [metric names], "champion_present", "gates": [entries]}``, each
    entry ``{"gate": "absolute"|"regression", "metric", "direction", "value", "threshold" or
    "champion_value" + "margin" + "threshold", "passed", "note"}``.
    """
    direction = {
        m: "max" if m in set(spec.lower_is_better) else "min" for m in (*spec.absolute, *spec.regression_margin)
    }
    gates = [_absolute(m, metrics.get(m), bound, direction[m]) for m, bound in spec.absolute.items()]
    if champion is not None:
        gates += [
            _regression(m, metrics.get(m), champion.get(m), margin, direction[m])
            for m, margin in spec.regression_margin.items()
        ]
    failed = [f"{g['gate']}:{g['metric']}" for g in gates if not g["passed"]]
    return {
        "passed": not failed,
        "failed": failed,
        "champion_present": champion is not None,
        "note": "" if champion is not None else "no champion: regression gates skipped, absolute gates only",
        "gates": gates,
    }


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if _usable(x) else "-"


def verdict_markdown(verdict: Mapping[str, Any]) -> str:
    """The verdict as a readable Markdown section (a summary line and one table row per gate)."""
    status = "PASSED" if verdict["passed"] else "FAILED"
    lines = [f"**Gates: {status}**"]
    if verdict["failed"]:
        lines[0] += " - failing: " + ", ".join(f"`{f}`" for f in verdict["failed"])
    if verdict.get("note"):
        lines.append(f"\n_{verdict['note']}_")
    lines += ["", "| gate | metric | value | rule | champion | result | note |", "|---|---|---:|---|---:|---|---|"]
    for g in verdict["gates"]:
        op = "<=" if g["direction"] == "max" else ">="
        if g["gate"] == "absolute":
            rule = f"{op} {_fmt(g['threshold'])}"
        else:
            sign = "+" if g["direction"] == "max" else "-"
            rule = f"{op} champion {sign} {g['margin']:g}" + (
                f" = {_fmt(g['threshold'])}" if g.get("threshold") is not None else ""
            )
        lines.append(
            f"| {g['gate']} | `{g['metric']}` | {_fmt(g['value'])} | {rule} | "
            f"{_fmt(g.get('champion_value'))} | {'pass' if g['passed'] else '**FAIL**'} | {g['note']} |"
        )
    return "\n".join(lines) + "\n"
