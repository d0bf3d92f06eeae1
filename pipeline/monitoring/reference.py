"""Building the reference profile (:mod:`pipeline.monitoring.profile`) of a model: a stratified,
seeded sample of the training split, its statistics (from the EDA feature table, computed with the
configuration recorded in the table's lineage), the model's predictions and projected embeddings."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import fsutil, lineage
from pipeline.core.metadata import FIELDS
from pipeline.core.params import FeatureConfig, MonitorParams, to_dict
from pipeline.core.predictions import pred_column
from pipeline.core.taxonomy import Taxonomy
from pipeline.data import splits
from pipeline.features.imagestats import DEFAULT_CONFIG, SHARPNESS, stat_columns
from pipeline.model import bundle
from pipeline.monitoring.batch import compute_batch
from pipeline.monitoring.profile import (
    META_COLUMNS,
    MonitorError,
    feature_config_from_dict,
    profile_schema,
    projection_matrix,
    stratified_sample,
    write_profile,
)


@dataclass(frozen=True)
class ReferenceInputs:
    """Where a profile's inputs are: the split files, the images, the model and the EDA table."""

    splits_dir: Path
    images_dir: Path
    model_dir: Path
    eda_dir: Path


def eda_feature_config(eda_dir: Path) -> FeatureConfig:
    """The feature configuration the EDA table was computed with (from its ``lineage.json``), so
    that monitoring computes current statistics identically."""
    lin = fsutil.require_json(eda_dir / "lineage.json", "EDA lineage", "run the eda stage first: dvc repro eda")
    eda = (lin.get("params") or {}).get("eda")
    if not isinstance(eda, dict) or not isinstance(eda.get("features"), dict):
        raise MonitorError(f"{eda_dir / 'lineage.json'}: no params.eda.features recorded (re-run dvc repro eda)")
    return feature_config_from_dict(eda["features"])


def _eda_statistics(eda_dir: Path, image_ids: list[str], config: FeatureConfig) -> pd.DataFrame:
    """The sampled images' rows of the EDA feature table (its statistics, without sharpness)."""
    table_file = eda_dir / "features.parquet"
    if not table_file.exists():
        raise MonitorError(f"{table_file}: EDA feature table missing (run dvc repro eda)")
    table = pd.read_parquet(table_file)
    num, cat = stat_columns(config)
    cols = [c for c in num + cat if c != SHARPNESS]
    lacking = [c for c in cols if c not in table]
    if lacking:
        raise MonitorError(f"{table_file}: lacks column(s) {', '.join(lacking[:5])}: re-run dvc repro eda")
    absent = sorted(set(image_ids) - set(table["image_id"]))
    if absent:
        raise MonitorError(
            f"{table_file}: no row for {len(absent)} training image(s), e.g. {absent[0]}: re-run dvc repro eda"
        )
    return table.set_index("image_id").loc[image_ids, cols].reset_index()


def build_reference(
    p: MonitorParams,
    taxonomy: Taxonomy,
    inputs: ReferenceInputs,
    out_dir: Path,
    use_eda_table: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Build and write the profile of ``inputs.model_dir``; return ``profile.json``'s content.
    With ``use_eda_table`` the statistics come from the EDA table (computed with its configuration);
    without, they are computed here with the default configuration."""
    from pipeline.model.inference import load_model

    t0 = time.perf_counter()
    train = splits.read_split(inputs.splits_dir, "train")
    sample = stratified_sample(train, p.max_reference_rows, p.seed)
    ids = list(sample["image_id"])
    config = eda_feature_config(inputs.eda_dir) if use_eda_table else DEFAULT_CONFIG
    predictor = load_model(inputs.model_dir, device="cpu")
    projection = projection_matrix(predictor.model.embedding_dim, p.projection_dim, p.seed)
    frame, errors = compute_batch(
        splits.image_files(sample, inputs.images_dir, "reference sample"),
        config=config,
        predictor=predictor,
        projection=projection,
        metadata=sample[[c for c in FIELDS if c in sample]],
        tta=p.tta,
        batch_size=p.batch_size,
        workers=p.workers,
        chunk_size=p.chunk_size,
        with_stats=not use_eda_table,
        progress=progress,
        desc="reference",
    )
    if errors:
        raise MonitorError(f"{len(errors)} training image(s) unreadable:\n  " + "\n  ".join(errors[:10]))
    base = sample[["image_id", *[c for c in META_COLUMNS if c in sample]]].copy()
    base["label"] = taxonomy.labels(base["dx"], predictor.native_level)
    if use_eda_table:
        base = base.merge(
            _eda_statistics(inputs.eda_dir, ids, config), on="image_id", how="left", validate="one_to_one"
        )
    profile = base.merge(frame, on="image_id", how="left", validate="one_to_one")
    schema = _schema(p, taxonomy, inputs, profile, predictor, projection, config, len(train), use_eda_table, t0)
    write_profile(Path(out_dir), profile, schema, projection)
    if progress:
        print(f"reference: {len(profile)} training images profiled in {schema['elapsed_s']} s -> {out_dir}", flush=True)
    return schema


def _schema(
    p: MonitorParams,
    taxonomy: Taxonomy,
    inputs: ReferenceInputs,
    profile: pd.DataFrame,
    predictor: Any,
    projection: np.ndarray,
    config: FeatureConfig,
    n_split: int,
    from_eda: bool,
    t0: float,
) -> dict[str, Any]:
    train_csv = inputs.splits_dir / "train.csv"
    lin = lineage.lineage(
        params={"monitor": to_dict(p), "labels": taxonomy.to_dict()},
        files=[train_csv, *(inputs.model_dir / name for name in bundle.TRAINED_FILES)],
    )
    pred = pred_column(predictor.native_level)
    return profile_schema(
        profile,
        config=config,
        native_level=predictor.native_level,
        classes=predictor.classes,
        projection=projection,
        seed=p.seed,
        tta=p.tta,
        model={
            "dir": str(inputs.model_dir),
            "model_md5": bundle.model_md5(inputs.model_dir),
            "backbone": predictor.config["architecture"]["backbone"],
            "embedding_dim": int(predictor.model.embedding_dim),
        },
        extra={
            "sampling": {
                "split": str(train_csv),
                "n_split": int(n_split),
                "max_rows": p.max_reference_rows,
                "seed": p.seed,
                "stratify": "dx",
                "class_counts": {str(k): int(v) for k, v in profile["dx"].value_counts().sort_index().items()},
            },
            "statistics_source": "eda feature table" if from_eda else "computed",
            "predicted_distribution": {
                str(k): round(float(v), 4) for k, v in profile[pred].value_counts(normalize=True).sort_index().items()
            },
            "elapsed_s": round(time.perf_counter() - t0, 1),
            "lineage": lin,
        },
    )
