"""Where each item of an audit bundle answers a question of the technical documentation of EU AI
Act Annex IV and of a predetermined change control plan (PCCP, as FDA's guidance lays it out).

Informational only: a map for the reader, not a claim of conformity.
"""

from __future__ import annotations

from typing import Any

#: Annex IV's sections, in its own words (shortened).
ANNEX_IV = {
    "1": "general description: intended purpose, versions, hardware and software it runs on",
    "2(a)": "development methods and steps, pre-trained systems used",
    "2(b)": "design specifications: logic, key choices, what it optimises, output",
    "2(c)": "system architecture, software components and how they build on each other",
    "2(d)": "data requirements: datasheets, provenance, scope, characteristics, labelling, cleaning",
    "2(e)": "human oversight measures",
    "2(f)": "pre-determined changes to the system and its performance",
    "2(g)": "validation and testing: data, metrics, test logs, dated reports",
    "3": "monitoring, functioning and control: capabilities, limitations, accuracy for groups",
    "4": "appropriateness of the performance metrics",
    "5": "risk management system (Article 9)",
    "6": "relevant changes through the lifecycle",
    "7": "harmonised standards or other specifications applied",
    "8": "EU declaration of conformity",
    "9": "post-market monitoring system and plan",
}
#: A change control plan's parts.
PCCP = {
    "description": "description of modifications: what may change and why",
    "protocol.data": "modification protocol: data management (new data, its reference standard, independence)",
    "protocol.retraining": "modification protocol: re-training practices",
    "protocol.evaluation": "modification protocol: performance evaluation and acceptance criteria decided in advance",
    "protocol.update": "modification protocol: update procedures, rollback, communication",
    "impact": "impact assessment: benefits, risks and their mitigation",
}
#: Bundle path prefix -> (what it is, Annex IV sections, PCCP parts).
ITEMS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "model/metadata.json": ("inputs, outputs, taxonomy, preprocessing, files and hashes", ("1", "2(b)"), ()),
    "model/config.json": (
        "the full training configuration and trust settings",
        ("2(a)", "2(b)"),
        ("protocol.retraining",),
    ),
    "model/lesionflow.json": (
        "lineage: data version, commit, dvc.lock, params, metrics",
        ("2(a)", "6"),
        ("protocol.update",),
    ),
    "model/gates.json": ("the gate verdict as evaluated", ("2(g)",), ("protocol.evaluation",)),
    "model/confidence.json": ("bootstrap intervals of the test metrics", ("2(g)", "4"), ("protocol.evaluation",)),
    "model/operating_point.json": ("the decision threshold, chosen on val, reported on test", ("2(b)", "2(e)"), ()),
    "model/scores.json": ("every headline test number", ("2(g)", "3"), ()),
    "model/model.pt": ("the weights audited (state_dict)", ("1",), ()),
    "card/": (
        "model card (intended use, limits, subgroups, calibration, OOD) and gate report",
        ("1", "2(e)", "3"),
        ("impact",),
    ),
    "data/": (
        "datasheet of the data version: counts, demographics, duplicates, licence, split independence",
        ("2(d)",),
        ("protocol.data",),
    ),
    "lineage/change_control.md": (
        "what a retraining may change, its triggers, acceptance criteria decided in advance, rollback",
        ("2(f)", "9"),
        ("description", "protocol.retraining", "protocol.evaluation", "protocol.update"),
    ),
    "card/sites.md": ("the model card's addendum: per-site operating points", ("2(e)", "3"), ("description", "impact")),
    "lineage/": (
        "params, dvc.lock, git state, data version",
        ("2(a)", "6"),
        ("protocol.retraining", "protocol.update"),
    ),
    "environment/": ("libraries, machines, CycloneDX SBOM, serving requirements", ("1", "2(c)"), ()),
    "gates/": (
        "acceptance criteria, thresholds, values with intervals, verdicts, previous champion",
        ("2(g)", "4"),
        ("protocol.evaluation",),
    ),
    "validation/external/": ("external validations on other sites' labelled images", ("2(g)", "3"), ("impact",)),
    "validation/sites/": ("per-site operating points and their suitability", ("2(e)", "3"), ("description", "impact")),
    "monitoring/": ("every drift check run against the model", ("9",), ("protocol.update",)),
    "history/": ("champion history with rollbacks and their reasons", ("6",), ("protocol.update",)),
    "inference_log/": ("the inference log's schema and counters (no patient records)", ("9",), ()),
}


def entry(path: str) -> dict[str, Any] | None:
    """The index entry of one bundle path (its longest matching prefix), or None."""
    match = max((p for p in ITEMS if path == p or (p.endswith("/") and path.startswith(p))), key=len, default=None)
    if match is None:
        return None
    what, annex, pccp = ITEMS[match]
    return {"what": what, "annex_iv": list(annex), "pccp": list(pccp)}


def index(paths: list[str]) -> dict[str, Any]:
    """The bundle's index: each path's entry, and the sections with the paths answering them."""
    by_path = {p: e for p in sorted(paths) if (e := entry(p)) is not None}
    sections = {s: [p for p, e in by_path.items() if s in e["annex_iv"]] for s in ANNEX_IV}
    plan = {s: [p for p, e in by_path.items() if s in e["pccp"]] for s in PCCP}
    return {
        "disclaimer": "informational map of this bundle to EU AI Act Annex IV and a PCCP; no legal claim",
        "annex_iv": {s: {"section": ANNEX_IV[s], "items": sections[s]} for s in ANNEX_IV},
        "pccp": {s: {"part": PCCP[s], "items": plan[s]} for s in PCCP},
        "items": by_path,
    }


def markdown(idx: dict[str, Any]) -> str:
    """The index as Markdown: per Annex IV section and PCCP part, the files answering it."""
    lines = ["# Index", "", f"_{idx['disclaimer']}._", "", "## EU AI Act Annex IV", ""]
    for s, v in idx["annex_iv"].items():
        items = ", ".join(f"`{p}`" for p in v["items"]) or "not covered by this bundle"
        lines.append(f"- **{s}** {v['section']}: {items}")
    lines += ["", "## Predetermined change control plan", ""]
    for s, v in idx["pccp"].items():
        items = ", ".join(f"`{p}`" for p in v["items"]) or "not covered by this bundle"
        lines.append(f"- **{s}** {v['part']}: {items}")
    return "\n".join(lines) + "\n"
