"""Shared by the labelling-loop tests: what Label Studio returns once a person has labelled tasks."""

from __future__ import annotations

import pandas as pd


def annotate(tasks: list[dict], truth: pd.DataFrame) -> list[dict]:
    """A Label Studio JSON export of ``tasks``: every task whose ``image_id`` is in ``truth``
    (``image_id``, ``dx``, ``dx_type``, ``lesion_id``) annotated with those values as an annotator
    would (a cancelled first attempt, then the real one); the others left without annotation."""
    by_id = truth.set_index("image_id")
    out = []
    for n, t in enumerate(tasks, 1):
        task = {"id": n, "data": t["data"], "predictions": t.get("predictions", []), "annotations": []}
        image_id = t["data"]["image_id"]
        if image_id in by_id.index:
            row = by_id.loc[image_id]
            result = [
                {"from_name": "dx", "to_name": "image", "type": "choices", "value": {"choices": [row["dx"]]}},
                {"from_name": "dx_type", "to_name": "image", "type": "choices", "value": {"choices": [row["dx_type"]]}},
                {
                    "from_name": "lesion_id",
                    "to_name": "image",
                    "type": "textarea",
                    "value": {"text": [row["lesion_id"]]},
                },
            ]
            cancelled = {"id": 2 * n, "was_cancelled": True, "result": result[:1]}
            task["annotations"] = [cancelled, {"id": 2 * n + 1, "was_cancelled": False, "result": result}]
        out.append(task)
    return out
