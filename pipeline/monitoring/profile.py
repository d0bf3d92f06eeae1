"""The reference profile: what drift monitoring compares current images with.

Built by the ``reference`` stage (:func:`build_reference`) for a stratified, seeded sample of the
training split and packaged with the model, so monitoring compares new images with the data of the
very model that serves them. One row per image (``profile.parquet``):

* the image statistics of :func:`pipeline.features.imagestats.image_statistics` (the EDA statistics,
  taken from the EDA feature table with the configuration recorded in its lineage, plus
  ``sharpness``: blur is invisible to the EDA statistics);
* the metadata (age, sex, localization) and the ``label`` at the model's native level;
* the model's prediction as prediction columns (:mod:`pipeline.core.predictions`: the native
  level's ``p_<level>_<class>`` and ``<level>_pred``, ``p_malignant``);
* the penultimate embedding reduced by a fixed seeded Gaussian random projection (``projection.npy``,
  so current data are projected identically), as ``emb_00``...

``profile.json`` holds the column roles, the feature configuration, the model's md5, the sampling
and the lineage. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.errors import LesionflowError
from pipeline.core.fsutil import read_json, staged_dir, write_json
from pipeline.core.metadata import FIELDS
from pipeline.core.params import FeatureConfig, to_dict
from pipeline.core.predictions import P_MALIGNANT, pred_column, prob_column
from pipeline.core.statsconfig import feature_config_from_dict
from pipeline.features.imagestats import stat_columns
from pipeline.model import bundle

PROFILE_FORMAT = "lesionflow-reference/2"
PROFILE_FILE = "profile.parquet"
SCHEMA_FILE = bundle.REFERENCE_SCHEMA_FILE
PROJECTION_FILE = bundle.REFERENCE_PROJECTION_FILE
EMBEDDING_PREFIX = "emb_"
METADATA_NUMERIC = ("age",)
METADATA_CATEGORICAL = ("sex", "localization")
#: Metadata columns kept in the profile.
META_COLUMNS = ("lesion_id", "dx", "dx_type", *FIELDS)


class MonitorError(LesionflowError, ValueError):
    """Bad input to monitoring (a missing or foreign profile, an unreadable batch): names the file."""


def embedding_columns(k: int) -> list[str]:
    """Names of the projected-embedding columns: ``emb_00`` ... (the profile and the inference log)."""
    return [f"{EMBEDDING_PREFIX}{i:02d}" for i in range(k)]


def projection_matrix(dim_in: int, dim_out: int, seed: int) -> np.ndarray:
    """A fixed Gaussian random projection ``(dim_in, dim_out)`` (Johnson-Lindenstrauss scaling)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / math.sqrt(dim_out)).astype(np.float32)


def read_feature_config(reference_dir: Path) -> FeatureConfig:
    """The feature configuration of a profile."""
    schema = json.loads((Path(reference_dir) / SCHEMA_FILE).read_text())
    return feature_config_from_dict(schema.get("feature_config") or {})


@dataclasses.dataclass
class Reference:
    """A loaded reference profile."""

    path: Path
    frame: pd.DataFrame
    schema: dict[str, Any]
    projection: np.ndarray

    @property
    def feature_config(self) -> FeatureConfig:
        """The statistics' configuration the profile was computed with."""
        return feature_config_from_dict(self.schema.get("feature_config") or {})

    @property
    def columns(self) -> dict[str, Any]:
        """Column roles: ``stat_numeric``, ``metadata_categorical``, ``prediction_numeric``, ``label`` ..."""
        return self.schema["columns"]


def profile_schema(
    frame: pd.DataFrame,
    *,
    config: FeatureConfig,
    native_level: str,
    classes: Sequence[str],
    projection: np.ndarray,
    seed: int,
    tta: bool,
    model: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``profile.json``: the column roles of ``frame`` and how it was made."""
    num, cat = stat_columns(config)
    return {
        "format": PROFILE_FORMAT,
        "columns": {
            "id": "image_id",
            "stat_numeric": [c for c in num if c in frame],
            "stat_categorical": [c for c in cat if c in frame],
            "metadata_numeric": [c for c in METADATA_NUMERIC if c in frame],
            "metadata_categorical": [c for c in METADATA_CATEGORICAL if c in frame],
            "prediction_categorical": [pred_column(native_level)],
            "prediction_numeric": [prob_column(native_level, c) for c in classes] + [P_MALIGNANT],
            "embedding": [c for c in frame.columns if c.startswith(EMBEDDING_PREFIX)],
            "label": "label" if "label" in frame else None,
        },
        "native_level": native_level,
        "classes": list(classes),
        "feature_config": to_dict(config),
        "tta": bool(tta),
        "projection": {
            "file": PROJECTION_FILE,
            "dim_in": int(projection.shape[0]),
            "dim_out": int(projection.shape[1]),
            "seed": int(seed),
            "kind": "gaussian random projection, N(0, 1/dim_out)",
        },
        "model": dict(model),
        "n_rows": int(len(frame)),
        **(dict(extra) if extra else {}),
    }


def write_profile(out_dir: Path, frame: pd.DataFrame, schema: Mapping[str, Any], projection: np.ndarray) -> Path:
    """Write the profile (parquet + JSON + .npy) into ``out_dir``, replaced only when complete."""
    with staged_dir(out_dir) as stage:
        frame.to_parquet(stage / PROFILE_FILE, index=False)
        np.save(stage / PROJECTION_FILE, projection, allow_pickle=False)
        write_json(stage / SCHEMA_FILE, schema)
    return Path(out_dir)


def load_reference(reference_dir: Path | str) -> Reference:
    """Load a profile written by :func:`write_profile`; errors name the missing or bad file."""
    d = Path(reference_dir)
    for name in (PROFILE_FILE, SCHEMA_FILE, PROJECTION_FILE):
        if not (d / name).exists():
            raise MonitorError(f"{d / name}: reference profile file missing (build it with `dvc repro reference`)")
    try:
        schema = json.loads((d / SCHEMA_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise MonitorError(f"{d / SCHEMA_FILE}: not valid JSON ({exc})") from None
    if schema.get("format") != PROFILE_FORMAT:
        raise MonitorError(f"{d / SCHEMA_FILE}: unsupported profile format {schema.get('format')!r}")
    frame = pd.read_parquet(d / PROFILE_FILE)
    projection = np.load(d / PROJECTION_FILE, allow_pickle=False)
    return Reference(d, frame, schema, projection)


def profile_model_md5(reference_dir: Path | str) -> str | None:
    """The md5 of the model a profile folder was built with (None when there is no profile)."""
    return ((read_json(Path(reference_dir) / SCHEMA_FILE) or {}).get("model") or {}).get("model_md5")


def check_model_matches(reference: Reference, model_dir: Path | str) -> None:
    """Refuse a model other than the one the profile was built with (embeddings incomparable)."""
    expected = (reference.schema.get("model") or {}).get("model_md5")
    actual = bundle.model_md5(model_dir, missing_ok=True)
    if expected and actual is not None and actual != expected:
        raise MonitorError(
            f"{Path(model_dir) / bundle.MODEL_FILE}: md5 {actual} differs from the model of the reference profile "
            f"{reference.path} ({expected}): rebuild the profile (dvc repro reference) or pass the matching model"
        )


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
