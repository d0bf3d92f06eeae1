"""Stage ``reference``: the drift-monitoring reference profile of the training split.

``python -m pipeline.reference`` takes a stratified (by ``dx``), seeded sample of at most
``monitor.max_reference_rows`` training images (``artifacts/splits/train.csv``), and writes to
``artifacts/reference/`` (replaced only when complete; see :mod:`pipeline.monitoring`):

``profile.parquet``  one row per sampled image: ``image_id``, ``dx`` and its native-level ``label``,
                     the metadata, the EDA image statistics (read from the EDA feature table
                     ``artifacts/eda/features.parquet``, not recomputed) plus ``sharpness``, the model's
                     ``pred_class`` / ``prob_<class>`` / ``p_malignant`` and the projected embedding
                     ``emb_00``...
``projection.npy``   the fixed seeded random projection of the embeddings (``(embedding_dim, k)``)
``profile.json``     column roles, feature configuration (from the EDA table's lineage), model md5,
                     sampling, lineage (git commit, data md5, params)

The profile is packaged with the model, so monitoring compares new images with the data of the
very model that serves them. Reads only the ``monitor`` section of params.yaml.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipeline import monitoring, params as params_mod
from pipeline.core import project
from pipeline.lineage import file_md5, lineage
from pipeline.taxonomy import Taxonomy

IMAGES_DIR = Path("data/images")
SPLITS_DIR = Path("artifacts/splits")
EDA_DIR = Path("artifacts/eda")
OUT_DIR = Path("artifacts/reference")
META_COLUMNS = ("lesion_id", "dx", "dx_type", "age", "sex", "localization")


class ReferenceError(ValueError):
    """Bad input to the stage (missing split, EDA table or model): the message names the file."""


def stratified_sample(frame: pd.DataFrame, n: int, seed: int, column: str = "dx") -> pd.DataFrame:
    """At most ``n`` rows (0 = all) keeping the class proportions of ``column`` (largest-remainder
    rounding, every class kept), seeded; sorted by image_id."""
    if n <= 0 or n >= len(frame):
        return frame.sort_values("image_id").reset_index(drop=True)
    counts = frame[column].value_counts().sort_index()
    quota = counts / counts.sum() * n
    take = np.maximum(np.floor(quota).astype(int), 1)
    rest = n - int(take.sum())
    if rest > 0:
        order = (quota - np.floor(quota)).sort_values(ascending=False).index[:rest]
        take[order] += 1
    take = np.minimum(take, counts)
    parts = [g.sample(int(take[k]), random_state=seed) for k, g in frame.groupby(column, sort=True)]
    return pd.concat(parts).sort_values("image_id").reset_index(drop=True)


def eda_feature_config(eda_dir: Path) -> Any:
    """The :class:`~pipeline.imagestats.FeatureConfig` the EDA table was computed with (from its
    ``lineage.json``), so that monitoring computes current statistics identically."""
    lin_file = eda_dir / "lineage.json"
    if not lin_file.exists():
        raise ReferenceError(f"{lin_file}: missing (run the eda stage first: dvc repro eda)")
    lin = json.loads(lin_file.read_text())
    eda = (lin.get("params") or {}).get("eda")
    if eda is None:
        raise ReferenceError(f"{lin_file}: no params.eda recorded")
    return params_mod.from_dict(params_mod.EdaParams, eda, "eda").feature_config()


def build_reference(
    p: params_mod.MonitorParams,
    taxonomy: Taxonomy,
    *,
    train_csv: Path,
    images_dir: Path,
    model_dir: Path,
    out_dir: Path,
    eda_features: pd.DataFrame | None = None,
    feature_config: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build and write the profile (see the module docstring); return ``profile.json``'s content.

    ``eda_features``: the EDA feature table (rows by ``image_id``); the statistics of the sampled
    images are taken from it (with ``feature_config``, its configuration). Without it, they are
    computed here."""
    from pipeline.inference import load_model

    t0 = time.perf_counter()
    if not Path(train_csv).exists():
        raise ReferenceError(f"{train_csv}: training split missing (run the split stage first)")
    train = pd.read_csv(train_csv, dtype={"image_id": str})
    sample = stratified_sample(train, p.max_reference_rows, p.seed)
    config = feature_config or monitoring.imagestats.DEFAULT_CONFIG
    predictor = load_model(model_dir, device="cpu")
    paths = [Path(images_dir) / f"{i}.jpg" for i in sample["image_id"]]
    missing = [str(x) for x in paths if not x.exists()]
    if missing:
        raise ReferenceError(f"{len(missing)} training image(s) missing, e.g. {missing[0]}")

    num, cat = monitoring.stat_columns(config)
    stats_cols = [c for c in num + cat if c != monitoring.SHARPNESS]
    with_stats = eda_features is None
    if not with_stats:
        lacking = [c for c in stats_cols if c not in eda_features]
        if lacking:
            raise ReferenceError(f"EDA feature table lacks column(s) {', '.join(lacking[:5])}: re-run dvc repro eda")
        known = set(eda_features["image_id"])
        absent = [i for i in sample["image_id"] if i not in known]
        if absent:
            raise ReferenceError(f"EDA feature table has no row for {len(absent)} training image(s), e.g. "
                                 f"{absent[0]}: re-run dvc repro eda")

    dim = predictor.model.embedding_dim
    projection = monitoring.projection_matrix(dim, p.projection_dim, p.seed)
    metadata = sample[[c for c in ("age", "sex", "localization") if c in sample]]
    frame, errors = monitoring.compute_batch(
        paths, config=config, predictor=predictor, projection=projection, metadata=metadata, tta=p.tta,
        batch_size=p.batch_size, workers=p.workers, chunk_size=p.chunk_size, with_stats=with_stats,
        progress=progress, desc="reference")
    if errors:
        raise ReferenceError(f"{len(errors)} training image(s) unreadable:\n  " + "\n  ".join(errors[:10]))
    base = sample[["image_id", *[c for c in META_COLUMNS if c in sample]]].copy()
    base["label"] = taxonomy.labels(base["dx"], predictor.native_level)
    if not with_stats:
        stats = eda_features.set_index("image_id").loc[list(sample["image_id"]), stats_cols].reset_index()
        base = base.merge(stats, on="image_id", how="left", validate="one_to_one")
    profile = base.merge(frame, on="image_id", how="left", validate="one_to_one")

    lin = lineage(params={"monitor": params_mod.to_dict(p), "labels": taxonomy.to_dict()},
                  files=[train_csv, Path(model_dir) / "model.pt", Path(model_dir) / "config.json"])
    schema = monitoring.profile_schema(
        profile, config=config, native_level=predictor.native_level, classes=predictor.classes,
        projection=projection, seed=p.seed, tta=p.tta,
        model={"dir": str(model_dir), "model_md5": file_md5(Path(model_dir) / "model.pt"),
               "backbone": predictor.config["architecture"]["backbone"],
               "embedding_dim": int(dim)},
        extra={
            "sampling": {"split": str(train_csv), "n_split": int(len(train)), "max_rows": p.max_reference_rows,
                         "seed": p.seed, "stratify": "dx",
                         "class_counts": {str(k): int(v) for k, v in profile["dx"].value_counts().sort_index().items()}},
            "statistics_source": "computed" if with_stats else "eda feature table",
            "predicted_distribution": {str(k): round(float(v), 4) for k, v in
                                       profile["pred_class"].value_counts(normalize=True).sort_index().items()},
            "elapsed_s": round(time.perf_counter() - t0, 1),
            "lineage": lin,
        })
    monitoring.write_profile(Path(out_dir), profile, schema, projection)
    if progress:
        print(f"reference: {len(profile)} training images profiled in {schema['elapsed_s']} s -> {out_dir}", flush=True)
    return schema


def main(argv: Sequence[str] | None = None) -> int:
    project.enter()  # paths are relative to the project root, from any subfolder
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from pipeline.inference import ModelLoadError

    p = params_mod.load_section("monitor")
    taxonomy = params_mod.load_taxonomy()
    table_file = EDA_DIR / "features.parquet"
    if not table_file.exists():
        raise SystemExit(f"reference: {table_file}: EDA feature table missing (run dvc repro eda)")
    try:
        schema = build_reference(
            p, taxonomy, train_csv=SPLITS_DIR / "train.csv", images_dir=IMAGES_DIR, model_dir=Path(p.model_dir),
            out_dir=args.out, eda_features=pd.read_parquet(table_file), feature_config=eda_feature_config(EDA_DIR),
            progress=not args.no_progress)
    except (ReferenceError, monitoring.MonitorError, ModelLoadError) as exc:
        raise SystemExit(f"reference: {exc}") from None
    return 0 if schema else 1


if __name__ == "__main__":
    raise SystemExit(main())
