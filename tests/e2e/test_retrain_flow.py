"""The retraining flow end to end (``lesionflow run`` in a subprocess) on a tiny real sample in a
throw-away workspace (its own git repo, DVC cache, Prefect and BentoML homes).

The runs share one Prefect server (started once for ``tests/e2e``; ``make run`` uses an ephemeral
one) and one workspace; the scenarios build on each other, in this order (each test runs the
steps it needs, so any one of them can also be run alone):

1. first run (``first_run`` of ``tests/e2e/conftest.py``): every stage runs, the model passes
   the (trivial) gates and is packaged; ``trace`` of the model and of the Bento gives back the
   data md5 of the sample and the commit;
2. second run, nothing changed, with an ephemeral Prefect server as ``make run`` has: DVC skips
   every stage; nothing is packaged again; no traceback or telemetry error in the output;
3. a new candidate (another train seed) against an impossible gate: ``GateFailed`` naming the
   metric, nothing packaged, the champion unchanged, the verdict judged against the champion;
4. data that violates the contract: ``ValidationFailed`` at validate, nothing downstream runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
import yaml

from tests.workspace_fixtures import STAGES, lesionflow

pytestmark = pytest.mark.e2e


class Workspace:
    """The shared workspace and the result of each scenario step (run once, in order)."""

    def __init__(self, root: Path, api_url: str):
        self.root = root
        self.api_url = api_url
        self.steps: dict[str, dict] = {}

    def champion(self) -> tuple[str | None, list[str]]:
        """(champion tag, every model tag) of the workspace's BentoML store."""
        from pipeline.registry import champions, store

        with mock.patch.dict(os.environ, {"BENTOML_HOME": str(self.root / ".lesionflow" / "bentoml")}):
            champ = champions.champion()
            return (champ["tag"] if champ else None), [str(m.tag) for m in store.models()]

    def _run(self, name: str, ephemeral: bool = False) -> dict:
        proc = lesionflow(self.root, "run", "--retries", "0", api_url=None if ephemeral else self.api_url)
        return self.record(name, proc)

    def record(self, name: str, proc: subprocess.CompletedProcess) -> dict:
        """Keep the result of the run ``proc`` as step ``name``."""
        last = json.loads((self.root / ".lesionflow/last_run.json").read_text())
        champ, models = self.champion()
        self.steps[name] = {"proc": proc, "out": proc.stdout, "last": last, "champion": champ, "models": models}
        return self.steps[name]

    def step(self, name: str) -> dict:
        if name in self.steps:
            return self.steps[name]
        if name == "first":
            return self._run("first")
        if name == "second":  # as `make run` does: an ephemeral Prefect server in .lesionflow/prefect
            self.step("first")
            return self._run("second", ephemeral=True)
        if name == "impossible_gate":
            self.step("second")
            params = yaml.safe_load((self.root / "params.yaml").read_text())
            params["train"]["seed"] = 7  # a new candidate
            params["evaluate"]["gates"]["absolute"]["dx.accuracy"] = 1.01  # no model reaches it
            (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            return self._run("impossible_gate")
        if name == "bad_data":
            self.step("impossible_gate")
            self.splits_mtime = (self.root / "artifacts/splits/train.csv").stat().st_mtime_ns
            meta = self.root / "data/HAM10000_metadata.csv"
            df = pd.read_csv(meta)
            df.loc[0, "dx"] = "melanoma"
            df.to_csv(meta, index=False)
            return self._run("bad_data")
        raise KeyError(name)


@pytest.fixture(scope="module")
def ws(first_run, prefect_api) -> Workspace:
    """The shared first run's workspace (``tests/e2e/conftest.py``), on which the later scenarios build."""
    w = Workspace(first_run["root"], prefect_api)
    w.record("first", first_run["proc"])
    return w


def api(ws: Workspace, path: str, body: dict) -> list | dict:
    """POST to the workspace's Prefect server API."""
    req = urllib.request.Request(
        f"{ws.api_url}/{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def flow_run_state(ws: Workspace, flow_run_id: str) -> tuple[str, str]:
    """(state type, state name) of a flow run as the Prefect server recorded it."""
    run = api(ws, "flow_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})[0]
    return run["state"]["type"], run["state"]["name"]


def _ran(last: dict) -> dict[str, bool]:
    return {s["stage"]: s["ran"] for s in last["stages"]}


def test_first_run_runs_every_stage_and_packages_a_traceable_champion(ws):
    r = ws.step("first")
    assert r["proc"].returncode == 0, r["out"][-4000:]
    last = r["last"]
    assert last["state"] == "Completed" and _ran(last) == dict.fromkeys(STAGES, True), last
    assert [s["stage"] for s in last["stages"]] == STAGES
    assert "validate | Running stage 'validate'" in r["out"], "stage output is streamed into the Prefect log"
    tag = last["packaged"]
    assert tag and r["champion"] == tag and r["models"] == [tag]
    assert last["bento"] and f"Champion: {tag}" in r["out"]
    data_md5 = yaml.safe_load((ws.root / "data.dvc").read_text())["outs"][0]["md5"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True).stdout.strip()
    for traced in (tag, last["bento"]):
        t = lesionflow(ws.root, "trace", traced, "--json", timeout=300)
        assert t.returncode == 0, t.stdout
        rec = json.loads(t.stdout[t.stdout.index("{") :])
        assert rec["tag"] == tag and rec["data_md5"] == data_md5 and rec["git_commit"] == head
        assert rec["gates"]["passed"] is True and rec["params"]["train"]["backbone"] == "small_cnn"
        assert f"git checkout {head}" in rec["restore"]
    stored = Path(rec["path"])
    assert (stored / "ood.npz").exists() and (stored / "retrieval" / "index.json").exists(), "packaged with the model"
    assert flow_run_state(ws, last["flow_run_id"]) == ("COMPLETED", "Completed")
    arts = api(ws, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [last["flow_run_id"]]}}})
    by_key = {a["key"]: a for a in arts}
    assert "| absolute | `dx.accuracy` |" in by_key["lesionflow-retrain"]["data"], "gate table published"
    assert "dx.balanced_accuracy" in by_key["lesionflow-retrain"]["data"], "key metrics published"
    link = by_key["lesionflow-report-evaluate-model-card-html"]["data"]
    assert (ws.root / "reports/evaluate/model_card.html").as_uri() in link, link
    # the packaged model carries its calibration and OOD detector; the card reports both
    card = (ws.root / "reports/evaluate/model_card.md").read_text()
    for text in (
        "Images the model cannot judge",
        "AUROC vs test",
        "Test images flagged",
        "before calibration",
        "Similar confirmed cases",
        "Precision@6",
    ):
        assert text in card, text
    head_metrics = json.loads((ws.root / "reports/evaluate/scores.json").read_text())
    assert {"auroc", "test_flagged_share"} <= set(head_metrics["ood"])
    assert "ece_before_calibration" in head_metrics["dx"]
    cfg = json.loads((ws.root / "artifacts/model/config.json").read_text())
    assert cfg["calibration"]["temperature"] > 0 and cfg["ood"]["method"] == "mahalanobis_layers"
    unknown = lesionflow(ws.root, "trace", "lesionflow-classifier:nosuchversion", timeout=300)
    assert unknown.returncode == 2 and "unknown tag" in unknown.stdout


def test_the_first_run_reviews_every_label_and_names_the_suspects_with_their_evidence(ws):
    """The review stage ranks every labelled image; its CSV gives each suspect's suggested diagnosis
    and confirmed look-alikes of other lesions; no label changes (the split files keep the data's)."""
    from pipeline.evaluation.labelreview import CSV_COLUMNS

    assert ws.step("first")["proc"].returncode == 0
    meta = pd.read_csv(ws.root / "data/HAM10000_metadata.csv")
    found = json.loads((ws.root / "reports/review/metrics.json").read_text())
    assert found["images"] == len(meta) and 0 <= found["suspects"] <= len(meta)
    assert set(found["by_diagnosis"]) == set(meta["dx"]) and set(found["by_confirmation"]) == set(meta["dx_type"])
    issues = pd.read_csv(ws.root / "reports/review/label_issues.csv", keep_default_na=False)
    assert tuple(issues.columns) == CSV_COLUMNS and len(issues) == found["suspects"]
    assert list(issues["rank"]) == list(range(1, len(issues) + 1))
    by_id = meta.set_index("image_id")
    for row in issues.itertuples():
        assert row.given == by_id.loc[row.image_id, "dx"] and row.split in ("train", "val", "test")
        for case in filter(None, row.similar_confirmed.split("; ")):
            other = by_id.loc[case.split(" ")[0]]
            assert other["dx_type"] == "histo" and other["lesion_id"] != by_id.loc[row.image_id, "lesion_id"]
    assert (ws.root / "reports/review/contact_sheet.png").stat().st_size > 0
    assert "never relabelled" in (ws.root / "reports/review/summary.md").read_text()
    split = pd.concat([pd.read_csv(ws.root / f"artifacts/splits/{s}.csv") for s in ("train", "val", "test")])
    assert split.set_index("image_id")["dx"].sort_index().equals(by_id["dx"].sort_index())


def test_second_run_with_nothing_changed_skips_every_stage(ws):
    first, r = ws.step("first"), ws.step("second")
    assert r["proc"].returncode == 0, r["out"][-4000:]
    assert _ran(r["last"]) == dict.fromkeys(STAGES, False), r["last"]["stages"]
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in r["out"]
    assert "Running stage" not in r["out"]
    assert r["last"]["packaged"] is None and "already the champion" in r["last"]["message"]
    assert r["champion"] == first["champion"] and r["models"] == first["models"]
    assert (ws.root / ".lesionflow" / "prefect").is_dir(), "the ephemeral server's home is the project's"
    for noise in ("Traceback", "telemetry", "database is locked"):
        assert noise not in r["out"], f"{noise!r} in the output of a benign run:\n{r['out'][-4000:]}"


def test_impossible_gate_packages_nothing_and_keeps_the_champion(ws):
    before, r = ws.step("second"), ws.step("impossible_gate")
    assert r["proc"].returncode == 1, r["out"][-4000:]
    last = r["last"]
    assert last["state"] == "GateFailed" and last["state_type"] == "FAILED"
    assert "absolute:dx.accuracy" in last["message"] and "1.0100" in last["message"]
    assert "GateFailed" in r["out"] and flow_run_state(ws, last["flow_run_id"]) == ("FAILED", "GateFailed")
    assert _ran(last) == {
        "validate": False,
        "split": False,
        "eda": False,
        "train": True,
        "retrieval": True,
        "review": True,
        "reference": True,
        "evaluate": True,
    }
    assert last["packaged"] is None and last["bento"] is None
    assert r["champion"] == before["champion"] and r["models"] == before["models"]
    verdict = json.loads((ws.root / "reports/evaluate/gates.json").read_text())
    champion_md5 = json.loads((ws.root / "artifacts/champion/champion.json").read_text())["model_md5"]
    assert verdict["passed"] is False and verdict["champion"]["md5"] == champion_md5
    assert verdict["model_md5"] != champion_md5, "a new candidate was judged against the champion"


def test_contract_violation_stops_the_flow_at_validate(ws):
    before, r = ws.step("impossible_gate"), ws.step("bad_data")
    assert r["proc"].returncode == 1, r["out"][-4000:]
    last = r["last"]
    assert last["state"] == "ValidationFailed", last
    assert flow_run_state(ws, last["flow_run_id"]) == ("FAILED", "ValidationFailed")
    assert "dx is one of" in last["message"] and "melanoma" in last["message"]
    assert "reports/validation/report.md" in last["message"]
    assert [s["stage"] for s in last["stages"]] == ["validate"]
    assert (ws.root / "artifacts/splits/train.csv").stat().st_mtime_ns == ws.splits_mtime
    assert r["champion"] == before["champion"] and r["models"] == before["models"]
