"""The labelling loop from a plain shell, in a throw-away workspace with a champion (a copy of the
shared first run of ``tests/e2e/conftest.py``): ``lesionflow label queue`` from a folder and from
the inference log (a disputed answer reaches the queue, first), the queue labelled in a real Label
Studio server (its own environment, started here on 127.0.0.1, driven through its SDK)
and its export brought back by ``lesionflow label import`` (a new data version with the expected
diff), and ``lesionflow label decide`` (a correction reaches the split of its whole lesion)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess

import pandas as pd
import pytest
from PIL import Image

from tests.labelstudio_fixtures import label_in_studio, labelstudio_server
from tests.workspace_fixtures import copy_workspace, lesionflow

PRED = {"binary_probabilities": {"benign": 0.9, "malignant": 0.1}}


@pytest.fixture(scope="module")
def workspace(first_run, tmp_path_factory) -> dict:
    """The first run's workspace, its reproduced pipeline committed, and a folder of unlabelled
    images: the held-back batch plus a blank image the model must refuse."""
    tmp = tmp_path_factory.mktemp("labels")
    root = copy_workspace(first_run["snapshot"], tmp / "ws")
    subprocess.run(["git", "add", "dvc.lock"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "Pipeline reproduced"], cwd=root, check=True)
    unlabelled = tmp / "unlabelled"
    shutil.copytree(first_run["batch_dir"] / "images", unlabelled)
    Image.new("RGB", (600, 450), (128, 128, 128)).save(unlabelled / "blank_grey.png")
    return {"root": root, "tmp": tmp, "unlabelled": unlabelled, "batch": first_run["batch"]}


def test_queue_from_a_folder_puts_refusals_first_and_writes_label_studio_tasks(workspace):
    root, batch = workspace["root"], workspace["batch"]
    dest = workspace["tmp"] / "queue"
    budget = len(batch) + 1
    res = lesionflow(root, "label", "queue", "--from", str(workspace["unlabelled"]), "--budget", str(budget),
                     "--out", str(dest))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:]
    q = pd.read_csv(dest / "queue.csv", dtype={"image_id": str}, keep_default_na=False)
    assert len(q) == budget and q["rank"].tolist() == list(range(1, budget + 1))
    # the tiny test model refuses some real images too; every refusal comes before the rest
    refused = q["reason"] == "refused"
    assert refused.any() and not refused.iloc[refused.sum() :].any()
    blank = q.set_index("image_id").loc["blank_grey"]
    assert blank["reason"] == "refused" and "blank" in blank["refused_because"]
    assert set(q.loc[~refused, "reason"]) <= {"informative", "random"} and set(q["image_id"]) - {"blank_grey"} <= set(
        batch["image_id"]
    )
    tasks = json.loads((dest / "tasks.json").read_text())
    assert [t["data"]["image_id"] for t in tasks] == q["image_id"].tolist()
    k = int(q.index[q["image_id"] != "blank_grey"][0])
    assert tasks[k]["data"]["image"].startswith("data:image/jpeg;base64,")
    assert tasks[k]["predictions"][0]["result"][0]["value"]["choices"] == [q.loc[k, "predicted_dx"]]
    assert "similar training cases" in tasks[k]["data"]["context"]
    image = dest / "images" / f"{q.loc[k, 'image_id']}.jpg"
    assert tasks[k]["data"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()  # import checks it
    assert '<Choices name="dx"' in (dest / "label_config.xml").read_text()
    assert sorted(p.name for p in (dest / "images").iterdir()) == sorted(
        f"{i}.png" if i == "blank_grey" else f"{i}.jpg" for i in q["image_id"]
    )
    summary = json.loads((dest / "queue.json").read_text())
    assert summary["queued"] == budget and summary["reasons"]["refused"] == refused.sum()
    assert len(summary["model_md5"]) == 32
    res = lesionflow(root, "label", "queue", "--from", str(workspace["unlabelled"]), "--out", str(dest))
    assert res.returncode != 0 and "already exists" in res.stdout  # nothing is overwritten
    workspace["queue"] = dest


def test_a_disputed_answer_in_the_log_comes_first(workspace):
    from pipeline.monitoring import inferencelog
    from pipeline.monitoring.logrecord import dispute_record, make_record

    root, batch = workspace["root"], workspace["batch"]
    log = root / "logs/inference"
    ids = list(batch["image_id"][:3])
    for n, image_id in enumerate(ids):
        data = (workspace["unlabelled"] / f"{image_id}.jpg").read_bytes()
        rec = make_record(stats={}, metadata={"age": 50.0, "sex": "female", "localization": "back"},
                          prediction=PRED, model_tag="t", request_id=f"req{n}",
                          image_bytes=data)  # fmt: skip
        inferencelog.append(rec, log)
    inferencelog.append(
        make_record(
            stats={},
            metadata={},
            prediction=PRED,
            model_tag="t",
            request_id="req9",
        ),
        log,
    )
    inferencelog.append(dispute_record("req2", "mel", note="irregular network"), log)
    dest = workspace["tmp"] / "queue-log"
    res = lesionflow(root, "label", "queue", "--from", "log", "--budget", "2", "--out", str(dest))
    assert res.returncode == 0, res.stdout[-3000:]
    assert "1 of 4 logged answer(s) kept no image" in " ".join(res.stdout.split())
    q = pd.read_csv(dest / "queue.csv", keep_default_na=False)
    assert q.loc[0, "image_id"] == "req2" and q.loc[0, "reason"] == "disputed" and q.loc[0, "disputed_dx"] == "mel"
    assert len(q) == 2 and q.loc[1, "reason"] in ("refused", "informative") and q.loc[1, "image_id"] != "req2"
    task = json.loads((dest / "tasks.json").read_text())[0]
    assert task["data"]["sex"] == "female" and "clinician said mel" in task["data"]["context"]
    assert base64.b64decode(task["data"]["image"].split(",", 1)[1])[:2] == b"\xff\xd8"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A Label Studio server of its own environment on 127.0.0.1: ``(url, token)``."""
    with labelstudio_server(tmp_path_factory.mktemp("studio")) as running:
        yield running


def test_the_queue_labelled_in_label_studio_becomes_a_new_data_version(workspace, studio):
    root, batch = workspace["root"], workspace["batch"]
    queue = workspace.get("queue")
    if queue is None:
        pytest.fail("needs the queue of test_queue_from_a_folder_puts_refusals_first_and_writes_label_studio_tasks")
    tasks = json.loads((queue / "tasks.json").read_text())
    export = label_in_studio(*studio, queue / "label_config.xml", queue / "tasks.json", batch, workspace["tmp"])
    assert len(export) == len(tasks) and sum(bool(t["annotations"]) for t in export) == len(batch)
    assert all(t["predictions"] for t in export)  # the model's answer came along as a pre-annotation
    path = workspace["tmp"] / "export.json"
    path.write_text(json.dumps(export))
    before = pd.read_csv(root / "data/HAM10000_metadata.csv", dtype=str)
    res = lesionflow(root, "label", "import", str(path), "--images", str(queue / "images"), "--commit",
                     "--no-progress")  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:]
    assert "1 task(s) not labelled, left out: blank_grey" in " ".join(res.stdout.split())
    after = pd.read_csv(root / "data/HAM10000_metadata.csv", dtype=str)
    added = after[~after["image_id"].isin(before["image_id"])]
    expected = batch.set_index("image_id")
    assert sorted(added["image_id"]) == sorted(batch["image_id"])
    for r in added.itertuples():
        assert (r.dx, r.lesion_id, r.dx_type) == tuple(expected.loc[r.image_id, ["dx", "lesion_id", "dx_type"]])
    diff = json.loads(next((root / "reports/data_diff").glob("data_diff.json")).read_text())
    assert diff["images"]["added"] == len(batch)
    assert {r["value"]: r["change"] for r in diff["dx"] if r["change"]} == batch["dx"].value_counts().to_dict()
    last = subprocess.run(["git", "log", "-1", "--format=%s"], cwd=root, capture_output=True, text=True).stdout
    assert last.startswith("Data: ingest images")


def test_a_decision_relabels_the_lesion_in_the_split(workspace):
    root = workspace["root"]
    meta = pd.read_csv(root / "data/HAM10000_metadata.csv", dtype=str)
    lesion = meta.groupby("lesion_id").filter(lambda g: len(g) > 1 and g["dx"].iloc[0] != "vasc")["lesion_id"].iloc[0]
    image = meta.loc[meta["lesion_id"] == lesion, "image_id"].iloc[0]
    res = lesionflow(root, "label", "decide", image, "--dx", "vasc", "--by", "Dr Test", "--note", "second opinion")
    assert res.returncode == 0, res.stdout[-3000:]
    decided = pd.read_csv(root / "labels/decisions.csv", dtype=str)
    assert decided.iloc[-1][["image_id", "decision", "dx", "reviewer"]].tolist() == [
        image,
        "corrected",
        "vasc",
        "Dr Test",
    ]
    res = lesionflow(root, "label", "decide", image, "--dx", "melanoma", "--by", "x")
    assert res.returncode != 0 and "--dx 'melanoma': expected one of" in res.stdout
    res = lesionflow(root, "dvc", "repro", "split")
    assert res.returncode == 0, res.stdout[-3000:]
    splits = pd.concat(pd.read_csv(root / f"artifacts/splits/{s}.csv", dtype=str) for s in ("train", "val", "test"))
    assert set(splits.loc[splits["lesion_id"] == lesion, "dx"]) == {"vasc"}
    assert "1 corrected" in res.stdout
    assert (meta["dx"] == pd.read_csv(root / "data/HAM10000_metadata.csv", dtype=str)["dx"]).all()
