"""Near-duplicates on real HAM10000 images (pipeline.data.neardup): copies of one image found,
distinct lesions left alone, the contract's warning (or error), and the split keeping a pair
together."""

from __future__ import annotations

import dataclasses
import io
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from pipeline.core import params
from pipeline.data import contract, contract_report, neardup, splitting
from pipeline.stages import validate
from tests.conftest import IMAGES_DIR, PROJECT_ROOT

P = params.load_section("validate", PROJECT_ROOT / "params.yaml")
META = params.load_section("metadata", PROJECT_ROOT / "params.yaml")
DX = params.load_taxonomy(PROJECT_ROOT / "params.yaml").diagnoses
#: Two different lesions (small dark dots on pale skin) that agree in coarse shape: the hardest
#: distinct pair the benchmark found in HAM10000.
LOOKALIKES = ("ISIC_0029289", "ISIC_0026826")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copies(image_id: str) -> dict[str, Image.Image]:
    with Image.open(IMAGES_DIR / f"{image_id}.jpg") as im:
        im = im.convert("RGB")
    w, h = im.size
    c, d = int(w * 0.05), int(h * 0.05)
    return {
        "resized_recompressed": _jpeg(im.resize((w * 2 // 3, h * 2 // 3)), 50),
        "cropped": im.crop((c, d, w - c, h - d)),
        "colour_shifted": ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.15)).enhance(0.8),
    }


@pytest.fixture(scope="module")
def sample(real_metadata) -> pd.DataFrame:
    """300 real images of distinct lesions, the two lookalikes among them."""
    one = real_metadata.drop_duplicates("lesion_id")
    rows = pd.concat([one[one["image_id"].isin(LOOKALIKES)], one.sample(298, random_state=4)])
    return rows.drop_duplicates("image_id").reset_index(drop=True)


def test_copies_are_found_and_distinct_lesions_are_not(sample):
    thumbs = np.stack([neardup.file_thumbnail(str(IMAGES_DIR / f"{i}.jpg")) for i in sample["image_id"]])
    ids = list(sample["image_id"])
    assert neardup.find_pairs(thumbs, ids) == []  # 300 different lesions, lookalikes included
    originals = ids[5:15]
    made = [(o, kind, neardup.thumbnail(img)) for o in originals for kind, img in copies(o).items()]
    pairs = neardup.find_pairs(
        np.stack([t for _, _, t in made]), [f"{o}/{k}" for o, k, _ in made], reference=thumbs, reference_ids=ids
    )
    found = {(p.a, p.b) for p in pairs}
    assert found == {(f"{o}/{k}", o) for o, k, _ in made}  # every copy, with its original only
    assert all(p.detail >= neardup.MIN_DETAIL for p in pairs)


@pytest.fixture
def folder_with_a_copy(tmp_path, sample):
    """A little dataset where the last row is a resized, re-compressed copy of the first image
    filed under another lesion."""
    rows = sample.head(12).copy()
    images = tmp_path / "images"
    images.mkdir()
    for i in rows["image_id"]:
        shutil.copyfile(IMAGES_DIR / f"{i}.jpg", images / f"{i}.jpg")
    copy = rows.iloc[[0]].assign(image_id="ISIC_9999999", lesion_id="HAM_9999999")
    copies(rows["image_id"].iloc[0])["resized_recompressed"].save(images / "ISIC_9999999.jpg", quality=70)
    rows = pd.concat([rows, copy], ignore_index=True)
    meta = tmp_path / "metadata.csv"
    rows.to_csv(meta, index=False)
    return meta, images, rows


def test_the_contract_warns_by_default_and_refuses_when_asked(folder_with_a_copy, tmp_path):
    meta, images, rows = folder_with_a_copy
    first = rows["image_id"].iloc[0]
    result = contract.validate(meta, images, P, META, DX, progress=False)
    assert result.passed, contract_report.format_failures(result)
    (warning,) = result.warnings
    assert warning.name == "near_duplicates_within_one_lesion" and warning.failures == 1
    assert "ISIC_9999999" in warning.examples[0] and first in warning.examples[0]
    groups = result.index.set_index("image_id")["near_group"]
    assert groups["ISIC_9999999"] == groups[first] == min(first, "ISIC_9999999")
    strict = contract.validate(meta, images, dataclasses.replace(P, near_duplicates="error"), META, DX, progress=False)
    assert not strict.passed and [c.name for c in strict.failed] == ["near_duplicates_within_one_lesion"]
    off = contract.validate(meta, images, dataclasses.replace(P, near_duplicates="off"), META, DX, progress=False)
    assert off.passed and not off.near_pairs and off.index["near_group"].isna().all()


def test_the_validate_stage_reports_the_pair_with_a_contact_sheet(folder_with_a_copy, tmp_path):
    meta, images, _ = folder_with_a_copy
    reports = tmp_path / "reports"
    code = validate.main(["--metadata", str(meta), "--images", str(images), "--reports", str(reports),
                          "--index", str(tmp_path / "index.csv"), "--no-progress"])  # fmt: skip
    assert code == 0
    sheet = Image.open(reports / contract.NEAR_SHEET)
    assert sheet.width > 400 and sheet.height >= 150
    report = (reports / "report.md").read_text()
    assert "**WARN**" in report and "ISIC_9999999" in report.split("## Near-duplicates")[1]


def test_the_split_keeps_a_near_duplicate_pair_together(folder_with_a_copy):
    meta, images, rows = folder_with_a_copy
    result = contract.validate(meta, images, P, META, DX, progress=False)
    first = rows["image_id"].iloc[0]
    for seed in range(8):
        out = splitting.make_split(rows, result.index, params.SplitParams(seed=seed)).set_index("image_id")
        assert out.loc["ISIC_9999999", "split"] == out.loc[first, "split"]
