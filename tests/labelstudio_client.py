"""What a labelling team does in Label Studio, through its SDK (``label-studio-sdk``), run by the
Python of Label Studio's own environment (``.venv-labelstudio/bin/python``; the SDK needs
``opencv-python``, which would sit beside the stack's ``opencv-python-headless``, both writing
``cv2/``): a project with the queue's interface, its tasks imported, every task whose ``image_id``
is in the truth CSV (``image_id``, ``dx``, ``dx_type``, ``lesion_id``) annotated through the API,
the others left, and the project exported as JSON.

    python tests/labelstudio_client.py URL TOKEN_FILE LABEL_CONFIG TASKS_JSON TRUTH_CSV EXPORT_JSON
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from label_studio_sdk import LabelStudio

    url, token_file, config, tasks, truth_csv, export = argv
    ls = LabelStudio(base_url=url, api_key=Path(token_file).read_text().strip())
    project = ls.projects.create(title="lesionflow labelling queue", label_config=Path(config).read_text())
    ls.projects.import_tasks(project.id, request=json.loads(Path(tasks).read_text()))
    with open(truth_csv, newline="") as fh:
        truth = {row["image_id"]: row for row in csv.DictReader(fh)}
    for task in ls.tasks.list(project=project.id):
        row = truth.get(task.data["image_id"])
        if row is None:
            continue
        ls.annotations.create(id=task.id, was_cancelled=False, result=[
            {"from_name": "dx", "to_name": "image", "type": "choices", "value": {"choices": [row["dx"]]}},
            {"from_name": "dx_type", "to_name": "image", "type": "choices", "value": {"choices": [row["dx_type"]]}},
            {"from_name": "lesion_id", "to_name": "image", "type": "textarea", "value": {"text": [row["lesion_id"]]}},
        ])  # fmt: skip
    Path(export).write_text(json.dumps(ls.projects.exports.as_json(project.id)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
