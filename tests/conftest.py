"""Shared fixtures. Tests are split by what they guard (Made-With-ML):

* ``tests/code``  - units of code on small synthetic fixtures;
* ``tests/data``  - the real data and data-handling stages (contract, split);
* ``tests/model`` - model behaviour (training, inference, metrics);
* ``tests/e2e``   - the real flow end to end on a tiny sample.

The real data (``data/``, pulled by ``make test``) must be present: tests that need it fail, not
skip, when it is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = PROJECT_ROOT / "data"
METADATA_CSV = DATA_DIR / "HAM10000_metadata.csv"
IMAGES_DIR = DATA_DIR / "images"

# Never touch the user's Prefect, BentoML or DVC state from a test.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def _require_real_data() -> None:
    if not METADATA_CSV.exists() or not IMAGES_DIR.is_dir():
        pytest.fail(f"real data missing under {DATA_DIR}: run `make test` (it pulls data with DVC)")


@pytest.fixture(scope="session")
def real_metadata() -> pd.DataFrame:
    """HAM10000's full metadata table."""
    _require_real_data()
    return pd.read_csv(METADATA_CSV)


def copy_sample(dest: Path, per_class: int, seed: int = 0, whole_lesions: bool = True) -> Path:
    """Copy a small real sample (``per_class`` lesions per diagnosis, all their images when
    ``whole_lesions``) into ``dest/data/{HAM10000_metadata.csv,images/}``; returns ``dest/data``."""
    _require_real_data()
    meta = pd.read_csv(METADATA_CSV)
    lesions = meta.drop_duplicates("lesion_id")
    picked = (
        lesions.groupby("dx", group_keys=False)
        .apply(lambda g: g.sample(min(per_class, len(g)), random_state=seed))
        ["lesion_id"]
    )
    rows = meta[meta["lesion_id"].isin(set(picked))] if whole_lesions else meta[meta["lesion_id"].isin(set(picked))].drop_duplicates("lesion_id")
    rows = rows.sort_values("image_id").reset_index(drop=True)
    out = dest / "data"
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "HAM10000_metadata.csv", index=False)
    for image_id in rows["image_id"]:
        shutil.copyfile(IMAGES_DIR / f"{image_id}.jpg", out / "images" / f"{image_id}.jpg")
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny real sample: 6 lesions per diagnosis with all their images (about 60 images)."""
    return copy_sample(tmp_path_factory.mktemp("tiny"), per_class=6)
