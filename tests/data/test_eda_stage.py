"""The `eda` stage on a tiny real sample: every declared output, a sane feature table, clear errors."""

from __future__ import annotations

import json
import math
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core import params
from pipeline.data import splits as split_files
from pipeline.features import analysis, baseline, batch, imagestats, linearmodel
from pipeline.stages import eda

ROOT = Path(__file__).resolve().parents[2]
PLOTS = [
    "class_distribution.png",
    "stats_by_class_image.png",
    "stats_by_class_lesion_shape.png",
    "stats_by_class_lesion_colour.png",
    "stats_by_class_abcd_colours.png",
    "sample_grid.png",
    "colour_presence.png",
    "auc_ranking.png",
    "permutation_importance.png",
    "baseline_confusion.png",
]
ARTIFACTS = ["features.parquet", "auc_ranking.csv", "permutation_importance.csv", "baseline_model.json", "lineage.json"]


def make_splits(data_dir: Path, dest: Path) -> Path:
    """Split files in the format of the `split` stage: per diagnosis, the first lesion to val,
    the second to test, the rest to train (whole lesions, sorted by image_id)."""
    meta = pd.read_csv(data_dir / "HAM10000_metadata.csv")
    split = {}
    for _, grp in meta.groupby("dx"):
        for i, lesion in enumerate(sorted(grp["lesion_id"].unique())):
            split[lesion] = "val" if i == 0 else "test" if i == 1 else "train"
    meta["split"] = meta["lesion_id"].map(split)
    dest.mkdir(parents=True, exist_ok=True)
    for s in ("train", "val", "test"):
        meta[meta["split"] == s].sort_values("image_id").to_csv(dest / f"{s}.csv", index=False)
    return dest


def eda_params(features=None, **overrides) -> params.EdaParams:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())["eda"]
    data.update({"grid_per_class": 2, "permutation_repeats": 2, "workers": 2, "chunk_size": 8, **overrides})
    data["features"] = {**data["features"], **(features or {})}
    return params.from_dict(params.EdaParams, data, "eda")


def stage_args(data: Path, splits: Path, out: Path, reports: Path) -> Namespace:
    """The stage's command-line arguments (pipeline.core.stagecli flag names)."""
    return Namespace(
        metadata=data / "HAM10000_metadata.csv",
        images=data / "images",
        splits=splits,
        out=out,
        reports=reports,
        no_progress=True,
    )


def run_stage(p: params.EdaParams, args: Namespace) -> dict:
    tax = params.load_taxonomy(ROOT / "params.yaml")
    return eda.run(args, p, tax, {"eda": params.to_dict(p), "labels": tax.to_dict()})


@pytest.fixture(scope="module")
def stage(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("eda")
    splits = make_splits(tiny_data, root / "splits")
    taxonomy = params.load_taxonomy(ROOT / "params.yaml")
    metrics = run_stage(eda_params(), stage_args(tiny_data, splits, root / "artifacts", root / "reports"))
    summary = json.loads((root / "reports" / "statistics.json").read_text())
    return {
        "root": root,
        "data": tiny_data,
        "splits": splits,
        "summary": summary,
        "metrics": metrics,
        "taxonomy": taxonomy,
    }


def test_writes_every_declared_output(stage):
    root = stage["root"]
    for name in ARTIFACTS:
        assert (root / "artifacts" / name).stat().st_size > 0, name
    for name in PLOTS:
        path = root / "reports" / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (root / "reports" / "report.md").read_text()
    for name in PLOTS:
        assert f"plots/{name}" in report, f"report does not show {name}"
    metrics = json.loads((root / "reports" / "summary.json").read_text())
    stats = json.loads((root / "reports" / "statistics.json").read_text())
    n_meta = len(pd.read_csv(stage["data"] / "HAM10000_metadata.csv"))
    assert stats["throughput"]["images"] == stage["summary"]["n_images"] == n_meta
    # DVC metrics: the key numbers only (the baseline the CNN must beat first); the rest in statistics.json
    assert list(metrics) == ["baseline_val_balanced_accuracy", "segmentation_failure_rate"]
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    for key in ("class_distribution", "segmentation", "per_class", "top_features", "baseline"):
        assert key in stage["summary"], key
    for folder in ("artifacts", "reports"):
        lineage = json.loads((root / folder / "lineage.json").read_text())
        assert {"git", "data", "params", "files"} <= set(lineage)
        assert lineage["params"]["eda"]["features"]["palette_k"] == 3


def test_feature_table_one_row_per_image_and_no_unexpected_nan(stage):
    table = pd.read_parquet(stage["root"] / "artifacts" / "features.parquet")
    meta = pd.read_csv(stage["data"] / "HAM10000_metadata.csv")
    assert len(table) == len(meta)
    assert sorted(table["image_id"]) == sorted(meta["image_id"])
    assert table["image_id"].is_unique
    assert set(table["split"]) == {"train", "val", "test"}
    assert {"lesion_id", "dx", "risk", "age", "sex", "localization", "seg_ok", "seg_status"} <= set(table.columns)
    # image-level statistics are always defined
    assert not table[list(imagestats.IMAGE_FEATURES)].isna().any().any()
    ok = table[table["seg_ok"]]
    failed = table[~table["seg_ok"]]
    lesion_cols = list(imagestats.lesion_features())
    assert len(ok) >= 0.7 * len(table), "the segmentation fails on most real images"
    assert not ok[lesion_cols].isna().any().any(), "NaN in a lesion feature of a segmented image"
    assert failed[lesion_cols].isna().all().all()
    assert (failed["seg_status"] != "ok").all() and (ok["seg_status"] == "ok").all()
    # real lesions: sizes in the image's pixels, within the frame
    assert (ok["lesion_width_px"] <= ok["width"]).all() and (ok["lesion_height_px"] <= ok["height"]).all()
    assert ok["n_colours"].between(0, 6).all()
    seg = stage["summary"]["segmentation"]
    assert seg["failure_rate"] == pytest.approx(len(failed) / len(table))


def test_summary_class_distribution_matches_the_table(stage):
    table = pd.read_parquet(stage["root"] / "artifacts" / "features.parquet")
    dist = stage["summary"]["class_distribution"]
    assert dist["dx"] == {d: int((table["dx"] == d).sum()) for d in stage["taxonomy"].diagnoses}
    assert sum(dist["risk"].values()) == len(table)
    assert sum(sum(v.values()) for v in dist["per_split"].values()) == len(table)
    per_class = stage["summary"]["per_class"]["brightness"]
    for d, grp in table.groupby("dx"):
        assert per_class[d]["median"] == pytest.approx(grp["brightness"].median())


def test_auc_ranking_is_ranked_and_valid(stage):
    ranking = pd.read_csv(stage["root"] / "artifacts" / "auc_ranking.csv")
    aucs = ranking[[c for c in ranking if c.startswith("auc_")]].to_numpy()
    assert np.nanmin(aucs) >= 0 and np.nanmax(aucs) <= 1
    assert (np.diff(ranking["separation"]) <= 1e-12).all()
    assert "width" not in set(ranking["feature"]), "a constant feature cannot separate anything"


def test_auc_by_rank_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=300), 1)  # with ties
    y = rng.random(300) < 0.3
    assert analysis.auc_by_rank(x, y) == pytest.approx(roc_auc_score(y, x))


def test_saved_baseline_reproduces_the_fitted_model(stage):
    table = pd.read_parquet(stage["root"] / "artifacts" / "features.parquet")
    model_json = json.loads((stage["root"] / "artifacts" / "baseline_model.json").read_text())
    assert model_json["format"] == linearmodel.FORMAT
    table = table.assign(seg_ok=table["seg_ok"].astype(float))
    p = eda_params()
    base = baseline.fit_baseline(table, model_json["features"], stage["taxonomy"], p)
    val = table[table["split"] == "val"]
    ours = linearmodel.predict_proba(model_json, val)
    ref = np.zeros_like(ours)
    ref[:, base.model.classes_] = base.model.predict_proba(val[model_json["features"]].astype(float))
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert model_json["classes"] == list(stage["taxonomy"].diagnoses)
    assert model_json["val_metrics"]["balanced_accuracy"] == pytest.approx(base.metrics["balanced_accuracy"])


def test_process_pool_equals_single_process(stage):
    paths = sorted((stage["data"] / "images").glob("*.jpg"))[:12]
    one = batch.compute_features(paths, workers=1, progress=False)
    many = batch.compute_features(paths, workers=2, chunk_size=3, progress=False)
    assert pd.DataFrame(one).equals(pd.DataFrame(many))


def test_missing_split_file_is_named(tmp_path, tiny_data):
    splits = make_splits(tiny_data, tmp_path / "splits")
    (splits / "val.csv").unlink()
    with pytest.raises(split_files.SplitError, match=r"val\.csv: split file not found"):
        split_files.split_table(splits)


def test_unreadable_image_is_named_and_previous_outputs_survive(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    splits = make_splits(data, tmp_path / "splits")
    first = sorted((data / "images").glob("*.jpg"))[0]
    first.write_bytes(b"not a jpeg")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "features.parquet").write_text("previous")
    with pytest.raises(batch.FeatureError, match=first.name):
        run_stage(eda_params(workers=1), stage_args(data, splits, artifacts, tmp_path / "reports"))
    assert (artifacts / "features.parquet").read_text() == "previous"
    assert not (tmp_path / "reports" / "summary.json").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ({"workers": -1}, "eda.workers"),
        ({"features": {"colour_rules": {"purple_max_l": 3.0}}}, "eda.features.colour_rules.purple_max_l"),
        ({"features": {"colour_min_share": 0.0}}, "eda.features.colour_min_share"),
        ({"baseline_level": "organ"}, "eda.baseline_level"),
    ],
)
def test_bad_params_name_the_key(override, key):
    with pytest.raises(params.ParamsError) as exc:
        eda_params(**override)
    assert exc.value.key == key


def test_params_section_in_the_file_is_valid():
    p = params.load_section("eda", ROOT / "params.yaml")
    cfg = p.features
    assert cfg == imagestats.FeatureConfig(**{**params.to_dict(cfg), "colour_rules": cfg.colour_rules})
    assert cfg.palette_k == 3 and not math.isnan(cfg.min_contrast)
