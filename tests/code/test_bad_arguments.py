"""A user's mistake never ends in a traceback: every command given a bad file (empty, binary, a
UTF-16 export, a folder), a missing or empty folder, an unknown tag or revision answers with one
line naming the file or value, and exit status 2. And no command replaces what it did not write."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.code.test_cli import invoke, workspace  # noqa: F401  (the fixture)
from tests.conftest import PROJECT_ROOT


@pytest.fixture()
def bad(tmp_path):
    """Bad inputs by kind: CSV files that are not tables, folders that are missing or empty."""
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty.csv").write_bytes(b"")
    (d / "binary.csv").write_bytes(bytes(range(256)) * 8)
    (d / "utf16.csv").write_bytes("image_id,dx\nISIC_0024306,nv\n".encode("utf-16"))
    (d / "folder.csv").mkdir()
    (d / "empty-folder").mkdir()
    images = d / "images"
    images.mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.full((150, 200, 3), 120, np.uint8)).save(buf, "JPEG")
    (images / "ISIC_0024306.jpg").write_bytes(buf.getvalue())
    return d


CSVS = ("empty.csv", "binary.csv", "utf16.csv", "folder.csv")


def _one_line(res, *named: str) -> None:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and len(lines) == 1, res.output
    assert all(n in lines[0] for n in named), (named, lines[0])


@pytest.mark.parametrize("csv", CSVS)
def test_bad_label_and_metadata_files_are_named(workspace, bad, csv):  # noqa: F811
    path = str(bad / csv)
    _one_line(invoke("validate-external", str(bad / "images"), path), path)
    _one_line(invoke("ingest", str(bad / "images"), "--metadata", path), path)
    _one_line(invoke("monitor", str(bad / "images"), "--metadata", path), path)


def test_missing_and_empty_folders_unknown_tags_and_revisions_are_named(workspace, bad):  # noqa: F811
    missing = str(bad / "nowhere")
    _one_line(invoke("predict", missing), missing)
    _one_line(invoke("predict", str(bad / "empty-folder")), str(bad / "empty-folder"))
    _one_line(invoke("similar", missing), missing)
    _one_line(invoke("monitor", missing), missing)
    _one_line(invoke("validate-external", missing, str(bad / "empty.csv")), missing)
    _one_line(invoke("trace", "lesionflow-classifier:nosuchversion"), "nosuchversion")
    _one_line(invoke("rollback", "lesionflow-classifier:nosuchversion", "--reason", "x"), "nosuchversion")
    _one_line(invoke("data", "diff", "no-such-revision"), "no-such-revision")
    _one_line(invoke("predict", str(bad / "images"), "--model", "lesionflow:nosuchbento"), "nosuchbento")


@pytest.mark.parametrize("csv", CSVS)
def test_a_stage_names_its_bad_input_in_one_line(tmp_path, bad, csv):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.validate", "--params", str(PROJECT_ROOT / "params.yaml"),
         "--metadata", str(bad / csv), "--images", str(bad / "images"), "--index", str(tmp_path / "index.csv"),
         "--reports", str(tmp_path / "reports"), "--no-progress"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and str(bad / csv) in proc.stderr


def test_an_output_folder_of_someone_elses_files_is_never_replaced(workspace, bad, tmp_path):  # noqa: F811
    """--out onto a folder lesionflow did not write is refused before any work, the files left as
    they were; a new folder is written and marked, so the same command may replace it next time."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    labels = bad / "labels.csv"
    labels.write_text("image_id,dx\nISIC_0024306,nv\n")
    res = invoke("validate-external", str(bad / "images"), str(labels), "--out", str(theirs))
    _one_line(res, str(theirs), "did not write")
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"] and (theirs / "notes.txt").read_text() == "mine"
    csv = tmp_path / "theirs.csv"
    csv.write_text("a,b\n1,2\n")
    _one_line(invoke("predict", str(bad / "images"), "--out", str(csv)), str(csv))
    assert csv.read_text() == "a,b\n1,2\n"
    ours = tmp_path / "predictions.csv"
    for _ in range(2):  # written, then replaced by the same command
        assert invoke("predict", str(bad / "images"), "--out", str(ours)).exit_code == 0
    sheet = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(sheet)
    _one_line(invoke("similar", str(bad / "images" / "ISIC_0024306.jpg"), "--sheet", str(sheet)), str(sheet))


def test_a_rollback_reason_is_recorded_and_shown_verbatim_whatever_it_contains(workspace, tmp_path):  # noqa: F811
    """A reason with console markup ([/] used to crash the command, [bold] to vanish)."""
    import json

    from pipeline.registry import package as packaging
    from tests.registry_fixtures import write_evaluation, write_model_dir

    root, first, _ = workspace
    model = write_model_dir(tmp_path / "second/model", seed=5)
    write_evaluation(model, tmp_path / "second/evaluate", tmp_path / "second/reports")
    packaging.package(model, tmp_path / "second/evaluate", tmp_path / "second/reports", project_root=root)
    reason = "[/] [bold]site B[/bold] sensitivity fell; see ticket [#42]"
    res = invoke("rollback", first, "--reason", reason, "--no-build")
    assert res.exit_code == 0, res.output
    assert repr(reason) in res.output.replace("\n", "")
    rows = json.loads(invoke("history", "--json").output)
    assert rows[-1]["reason"] == reason and rows[-1]["tag"] == first
    assert reason in invoke("history").output
    assert reason in invoke("trace", first).output.replace("\n", "")
