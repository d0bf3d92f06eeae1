"""The data contract (:mod:`pipeline.data.contract`, stage ``validate``): it passes the real data and
rejects each corruption with a message that names the problem. Corruptions are built from a small
synthetic fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core import params
from pipeline.data import contract, contract_report
from pipeline.stages import validate
from tests.conftest import IMAGES_DIR, METADATA_CSV, PROJECT_ROOT

P = params.load_section("validate", PROJECT_ROOT / "params.yaml")
META = params.load_section("metadata", PROJECT_ROOT / "params.yaml")
DX = params.load_taxonomy(PROJECT_ROOT / "params.yaml").diagnoses

ROWS = [  # lesion_id, image_id, dx, dx_type, age, sex, localization
    ("HAM_0000001", "ISIC_0000001", "nv", "follow_up", 45.0, "male", "back"),
    ("HAM_0000001", "ISIC_0000002", "nv", "follow_up", 45.0, "male", "back"),
    ("HAM_0000002", "ISIC_0000003", "mel", "histo", 70.0, "female", "face"),
    ("HAM_0000003", "ISIC_0000004", "bcc", "histo", None, "unknown", "unknown"),
    ("HAM_0000004", "ISIC_0000005", "bkl", "consensus", 0.0, "female", "trunk"),
    ("HAM_0000005", "ISIC_0000006", "akiec", "histo", 80.0, "male", "scalp"),
    ("HAM_0000006", "ISIC_0000007", "df", "consensus", 33.0, "male", "lower extremity"),
    ("HAM_0000007", "ISIC_0000008", "vasc", "confocal", 55.0, "female", "acral"),
]
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def _write_image(path: Path, seed: int, size=(96, 72)) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=90)


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path]:
    """A valid little dataset: (metadata.csv, images dir)."""
    images = tmp_path / "images"
    images.mkdir()
    for i, row in enumerate(ROWS):
        _write_image(images / f"{row[1]}.jpg", seed=i)
    meta = tmp_path / "metadata.csv"
    pd.DataFrame(ROWS, columns=COLUMNS).to_csv(meta, index=False)
    return meta, images


def run(meta: Path, images: Path) -> contract.ValidationResult:
    return contract.validate(meta, images, P, META, DX, progress=False)


def failed_check(result: contract.ValidationResult, name_part: str) -> contract.Check:
    assert not result.passed, "the contract should have failed"
    hits = [c for c in result.failed if name_part in c.name]
    assert hits, f"no failed check named *{name_part}*; failed: {[c.name for c in result.failed]}"
    return hits[0]


def edit_meta(meta: Path, fn) -> None:
    df = pd.read_csv(meta)
    df = fn(df)
    df.to_csv(meta, index=False)


def test_valid_fixture_passes(dataset):
    result = run(*dataset)
    assert result.passed, contract_report.format_failures(result)
    assert result.n_rows == len(ROWS)
    assert len(result.index) == len(ROWS)


def test_unknown_diagnosis(dataset):
    meta, images = dataset
    edit_meta(meta, lambda d: d.assign(dx=d["dx"].where(d.index != 2, "melanoma")))
    check = failed_check(run(meta, images), "be_in_set(dx)")
    assert check.failures == 1
    assert "ISIC_0000003" in check.examples[0] and "'melanoma'" in check.examples[0]


def test_missing_column(dataset):
    meta, images = dataset
    edit_meta(meta, lambda d: d.drop(columns=["sex"]))
    check = failed_check(run(meta, images), "column_to_exist(sex)")
    assert "'sex'" in check.description


def test_duplicate_image_id(dataset):
    meta, images = dataset
    edit_meta(meta, lambda d: pd.concat([d, d.iloc[[3]]]))
    check = failed_check(run(meta, images), "be_unique(image_id)")
    assert any("ISIC_0000004" in e for e in check.examples)


def test_lesion_with_two_diagnoses(dataset):
    meta, images = dataset
    edit_meta(meta, lambda d: d.assign(dx=d["dx"].where(d.index != 1, "mel")))
    check = failed_check(run(meta, images), "_dx_per_lesion")
    assert "HAM_0000001" in check.examples[0] and "mel" in check.examples[0] and "nv" in check.examples[0]


@pytest.mark.parametrize("age", [-5, 300])
def test_age_out_of_range(dataset, age):
    meta, images = dataset
    edit_meta(meta, lambda d: d.assign(age=d["age"].where(d.index != 4, age)))
    check = failed_check(run(meta, images), "be_between(age)")
    assert check.failures == 1 and f"age={float(age)!r}" in check.examples[0]


def test_age_not_numeric(dataset):
    meta, images = dataset
    edit_meta(meta, lambda d: d.assign(age=d["age"].astype(object).where(d.index != 4, "forty")))
    check = failed_check(run(meta, images), "be_in_set(_age_is_number)")
    assert check.failures == 1 and check.examples == ["row 5 (image_id ISIC_0000005): age='forty'"]


def test_unknown_sex(dataset):
    meta, images = dataset
    edit_meta(meta, lambda d: d.assign(sex=d["sex"].where(d.index != 0, "M")))
    check = failed_check(run(meta, images), "be_in_set(sex)")
    assert "sex='M'" in check.examples[0]


def test_image_id_pattern(dataset):
    meta, images = dataset
    edit_meta(meta, lambda d: d.assign(image_id=d["image_id"].where(d.index != 5, "IMG_6")))
    (images / "ISIC_0000006.jpg").rename(images / "IMG_6.jpg")
    check = failed_check(run(meta, images), "match_regex(image_id)")
    assert "IMG_6" in check.examples[0]


def test_image_id_pattern_is_a_parameter(dataset, tmp_path):
    """Other ISIC-style sets pass with their own pattern."""
    meta, images = dataset
    edit_meta(meta, lambda d: d.assign(image_id=d["image_id"].str.replace("ISIC_", "ISIC2020_")))
    for f in images.iterdir():
        f.rename(images / f.name.replace("ISIC_", "ISIC2020_"))
    custom = params.ValidateParams(**{**params.to_dict(P), "image_id_pattern": r"^ISIC2020_\d{7}$"})
    assert contract.validate(meta, images, custom, META, DX, progress=False).passed


def test_missing_image_file(dataset):
    meta, images = dataset
    (images / "ISIC_0000005.jpg").unlink()
    check = failed_check(run(meta, images), "image_files_exist")
    assert "ISIC_0000005" in check.examples[0]


def test_truncated_jpeg(dataset):
    meta, images = dataset
    f = images / "ISIC_0000003.jpg"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    check = failed_check(run(meta, images), "images_decode")
    assert "ISIC_0000003.jpg" in check.examples[0] and "truncated" in check.examples[0]


def test_text_file_named_jpg(dataset):
    meta, images = dataset
    (images / "ISIC_0000007.jpg").write_text("lesion_id,image_id\nthis is not an image\n")
    check = failed_check(run(meta, images), "images_decode")
    assert "ISIC_0000007.jpg" in check.examples[0] and "not an image" in check.examples[0]


def test_image_below_minimum_size(dataset):
    meta, images = dataset
    _write_image(images / "ISIC_0000008.jpg", seed=99, size=(40, 30))
    check = failed_check(run(meta, images), "images_decode")
    assert "ISIC_0000008.jpg" in check.examples[0] and "40x30" in check.examples[0]


def test_greyscale_image_is_not_rgb(dataset):
    meta, images = dataset
    Image.new("L", (96, 72), 128).save(images / "ISIC_0000006.jpg", "JPEG")
    check = failed_check(run(meta, images), "images_decode")
    assert "ISIC_0000006.jpg" in check.examples[0] and "RGB" in check.examples[0]


def test_orphan_image(dataset):
    meta, images = dataset
    _write_image(images / "ISIC_0009999.jpg", seed=7)
    check = failed_check(run(meta, images), "no_orphan_files")
    assert "ISIC_0009999.jpg" in check.examples[0]


def test_identical_images_within_one_lesion_are_reported_not_rejected(dataset):
    meta, images = dataset
    shutil.copyfile(images / "ISIC_0000001.jpg", images / "ISIC_0000002.jpg")
    result = run(meta, images)
    assert result.passed, contract_report.format_failures(result)
    assert result.duplicate_groups == [["ISIC_0000001", "ISIC_0000002"]]


def test_identical_images_in_two_lesions(dataset):
    meta, images = dataset
    shutil.copyfile(images / "ISIC_0000003.jpg", images / "ISIC_0000004.jpg")
    check = failed_check(run(meta, images), "duplicates_within_one_lesion")
    assert (
        "ISIC_0000003" in check.examples[0]
        and "HAM_0000002" in check.examples[0]
        and "HAM_0000003" in check.examples[0]
    )


def test_main_exits_nonzero_names_failures_and_writes_reports(dataset, tmp_path, capsys):
    meta, images = dataset
    edit_meta(meta, lambda d: d.assign(sex=d["sex"].where(d.index != 0, "M")))
    index = tmp_path / "out" / "images.csv"
    rc = validate.main(
        [
            "--metadata",
            str(meta),
            "--images",
            str(images),
            "--params",
            str(PROJECT_ROOT / "params.yaml"),
            "--reports",
            str(tmp_path / "rep"),
            "--index",
            str(index),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "sex" in err and "ISIC_0000001" in err
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["passed"] == 0 and summary["checks_failed"] == 1
    assert list(summary) == ["checks_failed", "near_duplicate_pairs", "passed"]  # the DVC metrics: key numbers only
    checks = json.loads((tmp_path / "rep" / "checks.json").read_text())
    assert checks["rows"] > 0 and checks["image_files"] > 0
    assert [c["name"] for c in checks["checks"] if not c["passed"]] == ["expect_column_values_to_be_in_set(sex)"]
    assert not index.exists(), "no index is written for data that violates the contract"
    assert "**FAIL**" in (tmp_path / "rep" / "report.md").read_text()


def test_real_data_passes_the_contract():
    result = contract.validate(METADATA_CSV, IMAGES_DIR, P, META, DX, progress=False)
    assert result.passed, contract_report.format_failures(result)
    assert result.n_rows == 10_015 and len(result.index) == 10_015
    # the two known byte-identical pairs, each within one lesion
    assert sorted(result.duplicate_groups) == [["ISIC_0024366", "ISIC_0029861"], ["ISIC_0024777", "ISIC_0029938"]]
