"""`dvc repro` runs validate and split on a tiny real sample; `dvc status` is clean afterwards;
a contract violation stops the pipeline at validate."""

from __future__ import annotations

import json
import subprocess

import pandas as pd

from tests.conftest import make_project, project_env


def dvc(root, *args, check=True):
    return subprocess.run(["dvc", *args], cwd=root, env=project_env(root), capture_output=True, text=True, check=check)


def test_repro_validate_and_split_then_nothing_to_do(tiny_data, tmp_path):
    root = make_project(tmp_path / "ws", tiny_data)
    out = dvc(root, "repro", "split")
    assert "Running stage 'validate'" in out.stdout and "Running stage 'split'" in out.stdout
    splits = [pd.read_csv(root / "artifacts/splits" / f"{s}.csv") for s in ("train", "val", "test")]
    assert sum(map(len, splits)) == len(pd.read_csv(root / "data/HAM10000_metadata.csv"))
    status = dvc(root, "status", "split")
    assert "up to date" in status.stdout, status.stdout
    again = dvc(root, "repro", "split")
    assert "Running stage" not in again.stdout
    metrics = dvc(root, "metrics", "show")
    assert "reports/split/summary.json" in metrics.stdout and "reports/validation/summary.json" in metrics.stdout
    # DVC's views hold numbers only (lists and text live in the stages' other outputs)
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    files = {k: v["data"] for rev in shown.values() for k, v in rev["data"].items() if "data" in v}

    def leaves(node):
        return [x for v in node.values() for x in leaves(v)] if isinstance(node, dict) else [node]

    assert set(files) == {"reports/validation/summary.json", "reports/split/summary.json"}
    for name, data in files.items():
        assert all(isinstance(x, int | float) and not isinstance(x, bool) for x in leaves(data)), (name, data)


def test_contract_violation_stops_at_validate(tiny_data, tmp_path):
    root = make_project(tmp_path / "ws", tiny_data)
    meta = root / "data/HAM10000_metadata.csv"
    df = pd.read_csv(meta)
    df.loc[0, "dx"] = "melanoma"
    df.to_csv(meta, index=False)
    out = dvc(root, "repro", "split", check=False)
    assert out.returncode != 0
    assert "dx is one of" in out.stderr + out.stdout and "'melanoma'" in out.stderr + out.stdout
    assert not (root / "artifacts/splits").exists(), "split must not run on data that violates the contract"


def test_lesionflow_dvc_runs_the_stages_from_a_plain_shell(tiny_data, tmp_path):
    """dvc.yaml runs `python -m pipeline.stages.<stage>`: from a shell whose PATH lacks the
    project's environment, `lesionflow dvc` puts the project's interpreter first, so the stages run
    (plain `dvc repro` finds no such python, or another one, there)."""
    import sys
    from pathlib import Path

    from tests.conftest import plain_env

    root = make_project(tmp_path / "ws", tiny_data)
    home = tmp_path / "home"
    home.mkdir()
    env = plain_env(home, DVC_SITE_CACHE_DIR=str(root / ".dvc-site-cache"))
    assert str(Path(sys.executable).parent) not in env["PATH"].split(":")
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "dvc", "repro", "validate"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Running stage 'validate'" in run.stdout and (root / "artifacts/validation/images.csv").exists()
