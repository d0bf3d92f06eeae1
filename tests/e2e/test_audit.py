"""An audit in one command, from a plain shell, on a copy of the shared first run (a packaged
champion in a git + DVC workspace): ``lesionflow audit keygen``, ``export``, ``verify`` (and what
it says of altered, re-signed and inconsistent bundles), ``reproduce``."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests.workspace_fixtures import copy_workspace, lesionflow


@pytest.fixture(scope="module")
def audited(first_run, tmp_path_factory) -> dict:
    """A copy of the first run, an operator's key pair and the champion's exported bundle."""
    tmp = tmp_path_factory.mktemp("audit")
    root = copy_workspace(first_run["snapshot"], tmp / "ws")
    keys = lesionflow(root, "audit", "keygen", str(tmp / "keys" / "operator"))
    assert keys.returncode == 0, keys.stdout
    res = lesionflow(root, "audit", "export", "--key", str(tmp / "keys/operator.key"), "--out", str(tmp / "a.zip"))
    assert res.returncode == 0, res.stdout[-3000:]
    trace = lesionflow(
        root, "trace", "--json", json.loads((root / ".lesionflow/last_run.json").read_text())["packaged"]
    )
    return {"root": root, "tmp": tmp, "zip": tmp / "a.zip", "keys": tmp / "keys", "out": res.stdout,
            "record": json.loads(trace.stdout[trace.stdout.index("{"):])}  # fmt: skip


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}


def rewrite(path: Path, dest: Path, change: dict[str, bytes]) -> Path:
    """A copy of the bundle ``path`` at ``dest`` with some files' bytes replaced (or added)."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(dest, "w") as out:
        top = src.namelist()[0].split("/", 1)[0]
        for name in src.namelist():
            out.writestr(name, change.pop(name.split("/", 1)[1], src.read(name)))
        for rel, data in change.items():
            out.writestr(f"{top}/{rel}", data)
    return dest


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(audited):
    key = audited["keys"] / "operator.key"
    assert key.stat().st_mode & 0o777 == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    before = key.read_bytes()
    again = lesionflow(audited["root"], "audit", "keygen", str(audited["keys"] / "operator"))
    assert again.returncode == 2 and "operator.key: already exists" in again.stdout
    assert key.read_bytes() == before


def test_export_holds_the_evidence_listed_and_hashed_in_a_signed_manifest(audited):
    files = members(audited["zip"])
    manifest = json.loads(files["manifest.json"])
    rec = audited["record"]
    assert manifest["tag"] == rec["tag"] and manifest["model_md5"] == rec["model_md5"]
    listed = manifest["files"]
    assert set(listed) == set(files) - {"manifest.json", "signature.json"}
    for rel, entry in listed.items():
        assert hashlib.sha256(files[rel]).hexdigest() == entry["sha256"], rel
    for rel in ("card/model_card.md", "data/datasheet.md", "lineage/params.yaml", "lineage/dvc_lock.json",
                "environment/sbom.cdx.json", "gates/criteria.md", "model/metadata.json", "model/model.pt",
                "history/champions.json", "inference_log/schema.json", "index.md",
                "lineage/change_control.md", "card/sites.md"):  # fmt: skip
        assert rel in files, rel
    assert hashlib.md5(files["model/model.pt"]).hexdigest() == rec["model_md5"]
    # the model card is the very one the evaluation wrote (its md5 in dvc.lock)
    assert files["card/model_card.md"] == (audited["root"] / "reports/evaluate/model_card.md").read_bytes()
    sbom = json.loads(files["environment/sbom.cdx.json"])
    names = {c["name"].lower() for c in sbom["components"]}
    assert {"torch", "dvc", "bentoml"} <= names and any(c.get("licenses") for c in sbom["components"])
    index = json.loads(files["index.json"])
    assert "data/datasheet.md" in index["annex_iv"]["2(d)"]["items"]
    assert "gates/criteria.md" in index["annex_iv"]["2(g)"]["items"] and index["annex_iv"]["5"]["items"] == []
    assert b"patient" not in files["inference_log/counters.json"]


def test_the_datasheet_and_criteria_are_those_of_the_model_s_data_and_gates(audited):
    files = members(audited["zip"])
    sheet = json.loads(files["data/datasheet.json"])
    meta = pd.read_csv(audited["root"] / "data/HAM10000_metadata.csv")
    assert sheet["diagnosis"] == meta["dx"].value_counts().sort_index().to_dict()
    assert sheet["images"] == len(meta) and sheet["lesions"] == meta["lesion_id"].nunique()
    assert sheet["data_version"]["md5"] == audited["record"]["data_md5"]
    split = sheet["split"]
    assert split["lesions_in_two_splits"] == 0 and split["near_duplicate_groups_in_two_splits"] == 0
    assert sum(split["sizes"].values()) == len(meta)
    assert sheet["licence"]["name"] == "CC BY-NC-SA 4.0" and "10.1038/sdata.2018.161" in sheet["licence"]["citation"]
    criteria = json.loads(files["gates/criteria.json"])
    gates = audited["record"]["gates"]["gates"]
    assert [(c["metric"], c["value"], c["passed"]) for c in criteria] == [
        (g["metric"], g["value"], g["passed"]) for g in gates
    ]


def test_verify_accepts_the_bundle_and_names_the_first_file_that_differs(audited):
    root, tmp, pub = audited["root"], audited["tmp"], str(audited["keys"] / "operator.pub")
    ok = lesionflow(root, "audit", "verify", str(audited["zip"]), "--key", pub)
    assert ok.returncode == 0 and "verified" in ok.stdout and audited["record"]["model_md5"] in ok.stdout, ok.stdout
    gates = json.loads(members(audited["zip"])["model/gates.json"])
    gates["passed"] = not gates["passed"]
    altered = rewrite(audited["zip"], tmp / "altered.zip", {"model/gates.json": json.dumps(gates).encode()})
    res = lesionflow(root, "audit", "verify", str(altered), "--key", pub)
    assert res.returncode == 1 and "FAILED" in res.stdout and "model/gates.json: sha256" in res.stdout, res.stdout
    added = rewrite(audited["zip"], tmp / "added.zip", {"model/extra.txt": b"slipped in"})
    res = lesionflow(root, "audit", "verify", str(added))
    assert res.returncode == 1 and "model/extra.txt: in the bundle but not in the manifest" in res.stdout
    not_a_bundle = tmp / "plain.zip"
    zipfile.ZipFile(not_a_bundle, "w").writestr("x.txt", "x")
    res = lesionflow(root, "audit", "verify", str(not_a_bundle))
    assert res.returncode == 2 and "not an audit bundle" in res.stdout


def test_verify_refuses_a_bundle_signed_by_another_key_or_that_contradicts_itself(audited):
    from pipeline.audit import seal, signing

    root, tmp = audited["root"], audited["tmp"]
    files = {k: v for k, v in members(audited["zip"]).items() if k not in ("manifest.json", "signature.json")}
    files = {k: v for k, v in files.items() if k not in ("index.json", "index.md")}
    summary = {k: json.loads(members(audited["zip"])["manifest.json"])[k] for k in ("tag", "model_md5", "data_md5")}
    signing.keygen(tmp / "keys" / "intruder")
    forged = seal.write_bundle(tmp / "forged.zip", files, summary, tmp / "keys/intruder.key")
    res = lesionflow(root, "audit", "verify", forged["path"], "--key", str(audited["keys"] / "operator.pub"))
    assert res.returncode == 1 and f"signed by key {forged['fingerprint']}, not by the trusted key" in res.stdout
    record = json.loads(files["model/lesionflow.json"])
    record["model_md5"] = "0" * 32
    lying = seal.write_bundle(
        tmp / "lying.zip",
        files | {"model/lesionflow.json": json.dumps(record).encode()},
        summary,
        tmp / "keys/intruder.key",
    )
    res = lesionflow(root, "audit", "verify", lying["path"])
    assert res.returncode == 1 and "model/lesionflow.json: model md5 " + "0" * 32 in res.stdout, res.stdout


def test_export_never_overwrites_and_names_a_missing_key(audited):
    root, before = audited["root"], audited["zip"].read_bytes()
    res = lesionflow(
        root, "audit", "export", "--key", str(audited["keys"] / "operator.key"), "--out", str(audited["zip"])
    )
    assert res.returncode == 2 and "already exists" in res.stdout and audited["zip"].read_bytes() == before
    res = lesionflow(
        root, "audit", "export", "--key", str(audited["tmp"] / "nokey.key"), "--out", str(audited["tmp"] / "b.zip")
    )
    assert res.returncode == 2 and "nokey.key: no such private key" in res.stdout
    assert not (audited["tmp"] / "b.zip").exists()
    bad = audited["tmp"] / "bad.key"
    bad.write_text("not a key")
    res = lesionflow(root, "audit", "export", "--key", str(bad), "--out", str(audited["tmp"] / "b.zip"))
    assert res.returncode == 2 and "bad.key: not an unencrypted PEM private key" in res.stdout


def test_reproduce_rebuilds_identical_weights_from_the_recorded_commit_data_and_params(audited):
    root = audited["root"]
    res = lesionflow(root, "audit", "reproduce", timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:]
    report_dir = Path(res.stdout.split("report: ", 1)[1].split("\n", 1)[0]).parent
    report = json.loads((report_dir / "report.json").read_text())
    md5 = audited["record"]["model_md5"]
    assert report["verdict"] == "identical" and report["reproduced_model_md5"] == report["recorded_model_md5"] == md5
    assert report["same_machine_type"] is True and report["machines"]["reproduced_on"]["cpu"]
    assert report["commit"] == audited["record"]["git_commit"] and report["clone"] is None
    assert f"reproduced `{md5}`" in (report_dir / "report.md").read_text()
    assert io.StringIO(res.stdout).read().count("Running stage 'train'") == 1
