"""The parts of an audit bundle written for a reader rather than a program: the sites recorded with
the model after its evaluation (the model card's addendum) and the change control plan the
pipeline enforces, both rendered from the model's own records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _num(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def sites_markdown(sites: Sequence[Mapping[str, Any]], model_threshold: float | None) -> str:
    """The sites recorded with the model (``lesionflow site add``) as the model card's addendum."""
    lines = [
        "# Model card addendum: sites",
        "",
        "Operating points measured at sites after the evaluation (`lesionflow site add`); the service applies a",
        f"site's threshold to requests naming it. The model's own threshold: {_num(model_threshold, 4)}.",
        "",
    ]
    if not sites:
        return "\n".join([*lines, "No site has been recorded with this model.", ""])
    lines += [
        "| site | recorded | images (malignant) | threshold [95 % CI] | sensitivity [CI] | specificity [CI] "
        "| suitable |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sites:

        def ci(k: str, s: Mapping[str, Any] = s) -> str:
            return "[" + ", ".join(_num(x) for x in (s.get(f"{k}_interval") or [None, None])) + "]"

        verdict = "yes" if s.get("suitable") else f"**no**: {s.get('reason')}"
        lines.append(
            f"| {s.get('name')} | {s.get('created_at')} | {s.get('n_images')} ({s.get('n_malignant')}) | "
            f"{_num(s.get('threshold'), 4)} {ci('threshold')} | {_num(s.get('sensitivity'))} {ci('sensitivity')} | "
            f"{_num(s.get('specificity'))} {ci('specificity')} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def change_plan_markdown(params: Mapping[str, Any]) -> str:
    """What a retraining may change, what triggers it, how a new model is accepted and undone, from
    the params the model was trained with."""
    ev = params.get("evaluate") or {}
    gates = ev.get("gates") or {}
    mon = params.get("monitor") or {}
    absolute = "".join(
        f"\n  - {k}: {'at most' if k in (gates.get('lower_is_better') or []) else 'at least'} {v}"
        for k, v in (gates.get("absolute") or {}).items()
    )
    margins = "".join(
        f"\n  - {k}: at most {v} worse than the champion" for k, v in (gates.get("regression_margin") or {}).items()
    )
    return f"""# Change control plan (as the pipeline enforces it)

**What may change.** A retraining refits the weights, the temperature, the out-of-distribution
statistics and threshold, the image-quality thresholds and the operating threshold on a new data
version, with the same code, taxonomy, input specification and params. Any change of code or
params is a new git commit and shows in the lineage.

**What triggers it.** New labelled data (`lesionflow ingest`: a new DVC data version), a schedule,
or confirmed drift in the monitoring flow (feature drift share {mon.get("drift_share")},
embedding drift share {mon.get("embedding_drift_share")}, at least {mon.get("min_batch_size")} images),
which runs `{mon.get("retrain_deployment")}`.

**Acceptance criteria, decided before the run** (params.yaml `evaluate.gates`), on the held-out test split:{absolute}
- and against the current champion:{margins or " (none)"}

A model that fails any criterion is not packaged and the champion stays.

**Update and rollback.** A passing model becomes the champion and its Bento is built;
`lesionflow rollback` restores an earlier champion, recorded with who and why (history/).
"""
