"""The split of the real data: no lesion and no byte-identical image spans two splits; the stage
writes byte-identical outputs for the same inputs and seed."""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from pipeline.core.layout import SPLITS
from pipeline.stages import split
from tests.conftest import IMAGES_DIR, PROJECT_ROOT


def test_real_split_is_leakage_free_and_deterministic(real_metadata, tmp_path):
    index = pd.DataFrame(
        {
            "image_id": real_metadata["image_id"],
            "md5": [hashlib.md5((IMAGES_DIR / f"{i}.jpg").read_bytes()).hexdigest() for i in real_metadata["image_id"]],
        }
    )
    index_csv = tmp_path / "images.csv"
    index.to_csv(index_csv, index=False)
    outs = []
    for run in ("a", "b"):
        rc = split.main(
            [
                "--metadata",
                str(PROJECT_ROOT / "data/HAM10000_metadata.csv"),
                "--index",
                str(index_csv),
                "--params",
                str(PROJECT_ROOT / "params.yaml"),
                "--out",
                str(tmp_path / run / "splits"),
                "--reports",
                str(tmp_path / run / "report"),
            ]
        )
        assert rc == 0
        outs.append({s: (tmp_path / run / "splits" / f"{s}.csv").read_bytes() for s in SPLITS})
    assert outs[0] == outs[1], "same inputs and seed must give byte-identical split files"

    df = pd.concat([pd.read_csv(tmp_path / "a" / "splits" / f"{s}.csv") for s in SPLITS])
    assert len(df) == len(real_metadata) and df["image_id"].is_unique
    assert (df.groupby("lesion_id")["split"].nunique() == 1).all()
    merged = df.merge(index, on="image_id")
    assert (merged.groupby("md5")["split"].nunique() == 1).all()
    summary = json.loads((tmp_path / "a" / "report" / "summary.json").read_text())
    assert list(summary) == ["lesions_spanning_splits", "max_class_share_deviation", "sizes"]  # DVC: key only
    assert all(isinstance(v, (int, float)) for v in _leaves(summary)), "DVC metrics hold numbers only"
    assert summary["lesions_spanning_splits"] == 0
    assert summary["max_class_share_deviation"] < 0.02
    assert abs(summary["sizes"]["train"] / len(df) - 0.70) < 0.01
    assert (tmp_path / "a" / "report" / "split_counts.png").stat().st_size > 10_000


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])
