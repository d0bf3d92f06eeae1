"""``lesionflow ingest`` refuses a batch it must not take, naming the row or file, and leaves
``data/`` and ``data.dvc`` byte for byte as they were: a lesion that changes diagnosis, a corrupt
image, a near-duplicate of an existing image under another lesion (accepted only when the user
says so). In a small throw-away git + DVC workspace of real images, from a plain shell."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.conftest import copy_sample, make_project
from tests.workspace_fixtures import TINY, copy_workspace, lesionflow, split_off_batch


def tree_md5(root: Path) -> dict[str, str]:
    """md5 of every file under ``data/`` plus ``data.dvc``: what must not change on a refusal."""
    files = sorted((root / "data").rglob("*")) + [root / "data.dvc"]
    return {str(f.relative_to(root)): hashlib.md5(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _refused(root: Path, batch_dir: Path, csv: Path) -> str:
    before = tree_md5(root)
    res = lesionflow(root, "ingest", str(batch_dir), "--metadata", str(csv), "--no-progress")
    assert res.returncode == 1, res.stdout[-3000:]
    assert "Refused" in res.stdout and tree_md5(root) == before
    return res.stdout


@pytest.fixture(scope="module")
def small_workspace(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("refuse")
    data = copy_sample(tmp / "sample", per_class=2, seed=5)
    batch = split_off_batch(data, tmp / "batch", per_class=1, seed=2)
    return {"root": make_project(tmp / "ws", data, TINY), "batch": batch, "tmp": tmp}


def _variant(small: dict, name: str) -> tuple[Path, Path, pd.DataFrame]:
    src = small["tmp"] / "batch"
    dest = small["tmp"] / name
    shutil.copytree(src / "images", dest / "images")
    return dest / "images", dest / "batch.csv", small["batch"].copy()


def test_a_lesion_that_changes_diagnosis_is_refused_naming_the_row(small_workspace):
    root = small_workspace["root"]
    images, csv, rows = _variant(small_workspace, "collide")
    current = pd.read_csv(root / "data/HAM10000_metadata.csv", dtype=str)
    existing = current.iloc[0]
    other_dx = next(d for d in ("nv", "mel") if d != existing["dx"])
    rows.loc[0, ["lesion_id", "dx"]] = [existing["lesion_id"], other_dx]
    rows.to_csv(csv, index=False)
    out = _refused(root, images, csv)
    assert f"row 2: lesion {existing['lesion_id']} is {existing['dx']} in the current data, {other_dx} here" in out


def test_a_corrupt_image_is_refused_naming_the_file(small_workspace):
    root = small_workspace["root"]
    images, csv, rows = _variant(small_workspace, "corrupt")
    rows.to_csv(csv, index=False)
    bad = images / f"{rows['image_id'][0]}.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    out = _refused(root, images, csv)
    assert f"{bad}: cannot be read" in out or f"{bad}: corrupt" in out


def test_a_near_duplicate_of_an_existing_image_under_another_lesion_is_refused(small_workspace):
    root = small_workspace["root"]
    images, csv, rows = _variant(small_workspace, "neardup")
    rows.to_csv(csv, index=False)
    current = pd.read_csv(root / "data/HAM10000_metadata.csv", dtype=str)
    victim = current["image_id"][0]
    copy = images / f"{rows['image_id'][0]}.jpg"
    with Image.open(root / "data/images" / f"{victim}.jpg") as im:  # resized and re-compressed
        im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(copy, quality=70)
    out = _refused(root, images, csv)
    assert str(copy) in out and f"copy of {root / 'data/images' / f'{victim}.jpg'}" in out
    # the same batch is accepted when the user says so (the split keeps the pair together), here in
    # a copy of the workspace so that the other refusals still see the original data
    other = copy_workspace(root, small_workspace["tmp"] / "ws-accept")
    ok = lesionflow(other, "ingest", str(images), "--metadata", str(csv), "--allow-near-duplicates", "--no-progress")
    assert ok.returncode == 0 and "warning" in ok.stdout, ok.stdout[-3000:]
