"""New labelled data in, a new data version out, and back: ``lesionflow ingest``, ``lesionflow data
diff``, the retraining flow on the new version, ``lesionflow history`` and ``lesionflow rollback``,
from a plain shell in a throw-away git + DVC workspace.

Data version 1 is a real HAM10000 sample minus a held-back set of lesions (a copy of the shared
first run of ``tests/e2e/conftest.py``); the held-back batch is then ingested. Refused batches:
``tests/e2e/test_ingest_refusals.py``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.workspace_fixtures import copy_workspace, lesionflow


def data_md5(root: Path) -> str:
    import yaml

    return yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]


@pytest.fixture(scope="module")
def workspace(first_run, prefect_api, tmp_path_factory) -> dict:
    """Data version 1 (a sample minus the held-back lesions) in a workspace retrained once: a copy
    of the shared first run (``tests/e2e/conftest.py``), its reproduced pipeline committed."""
    tmp = tmp_path_factory.mktemp("ingest")
    root = copy_workspace(first_run["snapshot"], tmp / "ws")
    # as a user records a reproduced pipeline (the champion names the commit before this one)
    subprocess.run(["git", "add", "dvc.lock"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "Pipeline reproduced"], cwd=root, check=True)
    batch = {"batch_dir": first_run["batch_dir"], "batch": first_run["batch"]}
    return {"root": root, **batch, "tmp": tmp, "api": prefect_api}


def test_ingest_a_new_data_version_diff_it_retrain_on_it_and_roll_back(workspace):
    root, batch_dir, batch = workspace["root"], workspace["batch_dir"], workspace["batch"]
    before = data_md5(root)
    n_before = len(pd.read_csv(root / "data/HAM10000_metadata.csv"))
    res = lesionflow(root, "ingest", str(batch_dir / "images"), "--metadata", str(batch_dir / "batch.csv"),
                     "--commit", "--no-progress")  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:]
    after = data_md5(root)
    assert after != before and f"{before} -> {after}" in res.stdout
    merged = pd.read_csv(root / "data/HAM10000_metadata.csv", dtype=str)
    assert len(merged) == n_before + len(batch) and set(batch["image_id"]) <= set(merged["image_id"])
    assert all((root / "data/images" / f"{i}.jpg").exists() for i in batch["image_id"])
    log = lesionflow(root, "dvc", "status", "data.dvc")
    assert log.returncode == 0 and "changed" not in log.stdout, log.stdout  # data.dvc describes data/
    last = subprocess.run(["git", "log", "-1", "--format=%s"], cwd=root, capture_output=True, text=True).stdout
    assert last.startswith("Data: ingest images") and f"+{len(batch)} images" in last

    # the diff against the champion's data version counts exactly the added images per class
    res = lesionflow(root, "data", "diff", "--out", str(workspace["tmp"] / "diff"))
    assert res.returncode == 0, res.stdout[-3000:]
    d = json.loads((workspace["tmp"] / "diff/data_diff.json").read_text())
    assert d["images"]["added"] == len(batch) and d["images"]["removed"] == 0
    assert d["files"]["added"] == len(batch) and d["files"]["deleted"] == 0
    assert d["files"]["modified"] == 1  # the metadata table, rows appended
    expected = batch["dx"].value_counts().to_dict()
    assert {r["value"]: r["change"] for r in d["dx"] if r["change"]} == expected
    assert set(d["new_lesions"]) == set(batch["lesion_id"])
    # per-split counts need the split outputs of that revision: dvc.lock was committed after the
    # champion's commit, so against the previous commit (the reproduced pipeline) they are there
    res = lesionflow(root, "data", "diff", "HEAD~1", "--out", str(workspace["tmp"] / "diff2"), "--no-image-stats")
    assert res.returncode == 0, res.stdout[-3000:]
    d2 = json.loads((workspace["tmp"] / "diff2/data_diff.json").read_text())
    assert sum(d2["splits"]["before"].values()) == n_before and d2["images"]["added"] == len(batch)
    assert "image_statistics" not in d2
    assert d["image_statistics"]["checked"] and d["image_statistics"]["added_images"] == len(batch)
    assert (workspace["tmp"] / "diff/data_diff.md").read_text().startswith("# Data diff")

    # the retraining flow runs on the new version: every stage from validate reruns, a new champion
    res = lesionflow(root, "run", api_url=workspace["api"])
    assert res.returncode == 0, res.stdout[-3000:]
    summary = json.loads((root / ".lesionflow/last_run.json").read_text())
    assert {"validate", "split", "train"} <= {s["stage"] for s in summary["stages"] if s["ran"]}
    assert summary["data_diff"]["added"] == len(batch)
    hist = json.loads(lesionflow(root, "history", "--json").stdout)
    assert [h["event"] for h in hist] == ["packaged", "packaged"]
    assert hist[-1]["data_md5"] == after and hist[0]["data_md5"] == before
    rollback_restores_the_first_champion(root, *[h["tag"] for h in hist])


def rollback_restores_the_first_champion(root: Path, first: str, second: str) -> None:
    """After two packaged champions: rollback restores the first, records why, rebuilds the Bento."""
    res = lesionflow(root, "rollback", "--reason", "sensitivity dropped on the new site")
    assert res.returncode == 0, res.stdout[-3000:]
    assert f"Champion: {first} again (was {second})" in res.stdout
    hist = json.loads(lesionflow(root, "history", "--json").stdout)
    assert [(h["event"], h["tag"]) for h in hist] == [("packaged", first), ("packaged", second), ("rollback", first)]
    assert hist[-1]["current"] and hist[-1]["reason"] == "sensitivity dropped on the new site" and "@" in hist[-1]["by"]
    status = lesionflow(root, "status")
    assert f"Champion: {first}" in status.stdout, status.stdout
    bento = status.stdout.split("Bento: ", 1)[1].split()[0]
    trace = json.loads(lesionflow(root, "trace", bento, "--json").stdout)
    assert trace["tag"] == first  # the Bento now serves the restored champion
    again = lesionflow(root, "rollback", first, "--reason", "twice")
    assert again.returncode != 0 and "already the champion" in again.stdout
