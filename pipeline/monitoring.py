"""Drift monitoring: compare current images with the training reference profile (Evidently 0.7).

The **reference profile** (``artifacts/reference/``, written by the ``reference`` stage and packaged
with the model) holds, for a stratified sample of the training split, one row per image with

* the EDA image statistics of :func:`pipeline.imagestats.image_features` (brightness, contrast,
  colour, lesion size/shape/colour; the same :class:`~pipeline.imagestats.FeatureConfig` as the EDA
  feature table) plus ``sharpness`` (:func:`sharpness`: blur is invisible to the EDA statistics);
* the metadata (age, sex, localization) and the label;
* the model's predicted class, class probabilities and malignancy probability;
* the penultimate-layer embedding reduced by a fixed seeded Gaussian random projection
  (``projection.npy``, so that current data are projected identically), as ``emb_00``...

``profile.parquet`` holds the rows, ``profile.json`` the column roles, the feature configuration,
the model's md5 and the lineage. No pickle anywhere.

**Current data** come from a folder of images (:func:`current_from_folder`: statistics in a
process pool with a progress bar, predictions and embeddings with :mod:`pipeline.inference`,
optional metadata CSV with optional ``dx`` labels) or from the service's inference log
(:func:`current_from_log`, see :mod:`pipeline.inferencelog`).

**The check** (:func:`run_check`) runs Evidently 0.7 reports (``evidently.Report``, presets from
``evidently.presets``; never the legacy API): data drift over the feature table (statistics +
metadata), prediction drift (predicted class, probabilities), embedding drift (share of drifted
projected components, or Evidently's domain classifier) and, when the current batch has labels,
classification quality against the reference. Each is saved as HTML + JSON under
``reports/monitoring/<UTC timestamp>/`` with ``summary.json`` / ``summary.md``: drifted columns,
drift share, embedding drift, the decision and its reason. Thresholds come from the ``monitor``
section of params.yaml (:class:`pipeline.params.MonitorParams`); below ``min_batch_size`` images
the decision is ``not_enough_data``.

Evidently and torch are imported lazily, so the service can import this module (for
:func:`image_statistics`) cheaply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

from pipeline import imagestats
from pipeline.fsutil import atomic_write_text, staged_dir, write_json
from pipeline.inferencelog import EMBEDDING_PREFIX, PROB_PREFIX, embedding_columns

PROFILE_FORMAT = "lesionflow-reference/1"
PROFILE_FILE = "profile.parquet"
SCHEMA_FILE = "profile.json"
PROJECTION_FILE = "projection.npy"
SUMMARY_FILE = "summary.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
METADATA_NUMERIC = ("age",)
METADATA_CATEGORICAL = ("sex", "localization")
STAT_CATEGORICAL = ("seg_status", "dominant_colour")
SHARPNESS = "sharpness"
MISSING = "(missing)"
NOT_ENOUGH_DATA, DRIFT, NO_DRIFT = "not_enough_data", "drift", "no_drift"


class MonitorError(ValueError):
    """Bad input to a monitoring check (missing profile, bad metadata CSV, ...): names the file."""


# ----------------------------------------------------------------------------------------------
# per-image statistics (the EDA statistics, plus sharpness)


def sharpness(rgb: np.ndarray, config: imagestats.FeatureConfig | None = None) -> float:
    """Mean absolute Laplacian of the luma (in [0, 1] units) on the same working copy as the EDA
    statistics (longer side ``config.working_max_side``): falls sharply with blur or upscaling."""
    config = config or imagestats.DEFAULT_CONFIG
    work = imagestats.working_copy(np.asarray(rgb, dtype=np.uint8), config.working_max_side).astype(np.float32)
    luma = (work[..., 0] * 0.299 + work[..., 1] * 0.587 + work[..., 2] * 0.114) / 255.0
    return float(np.abs(ndimage.laplace(luma, mode="reflect")).mean())


def image_statistics(rgb: np.ndarray, config: imagestats.FeatureConfig | None = None) -> dict[str, Any]:
    """:func:`pipeline.imagestats.image_features` of ``rgb`` plus :func:`sharpness`."""
    config = config or imagestats.DEFAULT_CONFIG
    return {**imagestats.image_features(rgb, config), SHARPNESS: sharpness(rgb, config)}


def stat_columns(config: imagestats.FeatureConfig | None = None) -> tuple[list[str], list[str]]:
    """(numerical, categorical) statistic columns of :func:`image_statistics`."""
    config = config or imagestats.DEFAULT_CONFIG
    names = [n for n in imagestats.feature_names(config) if n not in ("seg_ok",)]
    cat = [n for n in names if n in STAT_CATEGORICAL]
    num = [n for n in names if n not in STAT_CATEGORICAL] + [SHARPNESS]
    return num, cat


def feature_config_to_dict(config: imagestats.FeatureConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def feature_config_from_dict(d: Mapping[str, Any]) -> imagestats.FeatureConfig:
    """Inverse of :func:`feature_config_to_dict` (unknown keys of a newer version are ignored)."""
    known = {f.name for f in dataclasses.fields(imagestats.FeatureConfig)}
    kw = {k: v for k, v in d.items() if k in known}
    if isinstance(kw.get("colour_rules"), Mapping):
        rule_names = {f.name for f in dataclasses.fields(imagestats.ColourRules)}
        kw["colour_rules"] = imagestats.ColourRules(**{k: v for k, v in kw["colour_rules"].items() if k in rule_names})
    return imagestats.FeatureConfig(**kw)


def read_feature_config(reference_dir: Path) -> imagestats.FeatureConfig:
    schema = json.loads((Path(reference_dir) / SCHEMA_FILE).read_text())
    return feature_config_from_dict(schema.get("feature_config") or {})


# ----------------------------------------------------------------------------------------------
# embeddings projection


def projection_matrix(dim_in: int, dim_out: int, seed: int) -> np.ndarray:
    """A fixed Gaussian random projection ``(dim_in, dim_out)`` (Johnson-Lindenstrauss scaling)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim_in, dim_out)) / math.sqrt(dim_out)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# computing a batch: statistics (process pool) + predictions and projected embeddings


def _process_chunk(
    paths: Sequence[str], config: imagestats.FeatureConfig, input_size: tuple[int, int] | None, with_stats: bool
) -> list[tuple[str, dict[str, Any] | None, np.ndarray | None, str | None]]:
    """Decode each file once; its statistics (or only sharpness) and its model-input pixels."""
    from pipeline.datapath import fit_to_size
    from pipeline.images import ImageError, decode_rgb

    out = []
    for p in paths:
        try:
            rgb = decode_rgb(Path(p), str(p))
            stats = image_statistics(rgb, config) if with_stats else {SHARPNESS: sharpness(rgb, config)}
            pix = None
            if input_size is not None:  # (H, W, 3) at the model's input size: Predictor.predict's fast path
                pix = np.ascontiguousarray(fit_to_size(rgb, *input_size))
            out.append((p, stats, pix, None))
        except (ImageError, ValueError, OSError) as exc:
            out.append((p, None, None, str(exc)))
    return out


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def compute_batch(
    paths: Sequence[Path | str],
    *,
    config: imagestats.FeatureConfig,
    predictor: Any = None,
    projection: np.ndarray | None = None,
    metadata: pd.DataFrame | None = None,
    tta: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    chunk_size: int = 32,
    with_stats: bool = True,
    progress: bool = True,
    desc: str = "monitor",
) -> tuple[pd.DataFrame, list[str]]:
    """Rows (``image_id`` = file stem, in the order given) of statistics, and with a
    ``predictor`` the predicted class, ``prob_<class>``, ``p_malignant`` and the projected
    embedding ``emb_XX``; plus the messages of unreadable files (skipped).

    Statistics run over ``workers`` processes (0 = all cores) in chunks, each file decoded once;
    ``metadata`` (aligned with ``paths``) goes to fusion models."""
    from tqdm import tqdm

    paths = [str(p) for p in paths]
    input_size = tuple(predictor.input_size) if predictor is not None else None
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    n_workers = min(resolve_workers(workers), max(1, len(chunks)))
    results: dict[int, list] = {}
    bar = tqdm(total=len(paths), desc=f"{desc}: image statistics", unit="img", disable=not progress)
    if n_workers == 1:
        for i, chunk in enumerate(chunks):
            results[i] = _process_chunk(chunk, config, input_size, with_stats)
            bar.update(len(chunk))
    else:
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            futs = {pool.submit(_process_chunk, c, config, input_size, with_stats): i for i, c in enumerate(chunks)}
            for fut in as_completed(futs):
                results[futs[fut]] = fut.result()
                bar.update(len(chunks[futs[fut]]))
    bar.close()
    items = [it for i in range(len(chunks)) for it in results[i]]
    errors = [err for _, _, _, err in items if err is not None]
    keep = [k for k, it in enumerate(items) if it[3] is None]
    rows = [{"image_id": Path(items[k][0]).stem, **items[k][1]} for k in keep]
    frame = pd.DataFrame(rows) if rows else pd.DataFrame({"image_id": pd.Series([], dtype=str)})
    if predictor is not None and keep:
        pix = [items[k][2] for k in keep]
        meta = metadata.iloc[keep].reset_index(drop=True) if metadata is not None else None
        t0 = time.perf_counter()
        out = predictor.predict(pix, metadata=meta, tta=tta, batch_size=batch_size)
        if progress:
            print(f"{desc}: predicted {len(keep)} images in {time.perf_counter() - t0:.1f} s", flush=True)
        frame = pd.concat([frame, prediction_frame(out, projection)], axis=1)
    return frame, errors


def prediction_frame(out: Mapping[str, Any], projection: np.ndarray | None) -> pd.DataFrame:
    """``pred_class``, ``prob_<class>`` (native level), ``p_malignant`` and ``emb_XX`` columns
    from :meth:`pipeline.inference.Predictor.predict`'s output."""
    level = out["native_level"]
    classes = list(out["classes"][level])
    probs = np.asarray(out["native_probs"], dtype=np.float64)
    cols: dict[str, Any] = {"pred_class": [classes[i] for i in probs.argmax(axis=1)]}
    for j, c in enumerate(classes):
        cols[f"{PROB_PREFIX}{c}"] = probs[:, j]
    cols["p_malignant"] = np.asarray(out["p_malignant"], dtype=np.float64) if out.get("p_malignant") is not None \
        else np.full(len(probs), np.nan)
    frame = pd.DataFrame(cols)
    if projection is not None:
        emb = np.asarray(out["embeddings"], dtype=np.float32)
        if emb.shape[1] != projection.shape[0]:
            raise MonitorError(f"model embeddings have {emb.shape[1]} dims but the reference projection expects "
                               f"{projection.shape[0]}: the reference profile belongs to another model")
        proj = emb @ projection
        frame = pd.concat([frame, pd.DataFrame(proj, columns=embedding_columns(proj.shape[1]))], axis=1)
    return frame


# ----------------------------------------------------------------------------------------------
# the reference profile


@dataclasses.dataclass
class Reference:
    """A loaded reference profile."""

    path: Path
    frame: pd.DataFrame
    schema: dict[str, Any]
    projection: np.ndarray

    @property
    def feature_config(self) -> imagestats.FeatureConfig:
        return feature_config_from_dict(self.schema.get("feature_config") or {})

    @property
    def columns(self) -> dict[str, Any]:
        return self.schema["columns"]


def profile_schema(
    frame: pd.DataFrame, *, config: imagestats.FeatureConfig, native_level: str, classes: Sequence[str],
    projection: np.ndarray, seed: int, tta: bool, model: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
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
            "prediction_categorical": ["pred_class"],
            "prediction_numeric": [f"{PROB_PREFIX}{c}" for c in classes] + ["p_malignant"],
            "embedding": [c for c in frame.columns if c.startswith(EMBEDDING_PREFIX)],
            "label": "label" if "label" in frame else None,
        },
        "native_level": native_level,
        "classes": list(classes),
        "feature_config": feature_config_to_dict(config),
        "tta": bool(tta),
        "projection": {"file": PROJECTION_FILE, "dim_in": int(projection.shape[0]),
                       "dim_out": int(projection.shape[1]), "seed": int(seed),
                       "kind": "gaussian random projection, N(0, 1/dim_out)"},
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


def check_model_matches(reference: Reference, model_dir: Path | str) -> None:
    """Refuse a model other than the one the profile was built with (embeddings incomparable)."""
    from pipeline.lineage import file_md5

    expected = (reference.schema.get("model") or {}).get("model_md5")
    weights = Path(model_dir) / "model.pt"
    if expected and weights.exists() and file_md5(weights) != expected:
        raise MonitorError(
            f"{weights}: md5 {file_md5(weights)} differs from the model of the reference profile "
            f"{reference.path} ({expected}): rebuild the profile (dvc repro reference) or pass the matching model")


# ----------------------------------------------------------------------------------------------
# current data


def list_images(folder: Path | str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MonitorError(f"{folder}: not a folder of images")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_metadata_csv(path: Path | str, taxonomy: Any = None) -> pd.DataFrame:
    """An optional metadata CSV for a folder: ``image_id`` (file stem) plus any of age, sex,
    localization and ``dx`` (labels). Errors name the file, row and field."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={"image_id": str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise MonitorError(f"{path}: cannot be read as CSV ({exc})") from None
    if "image_id" not in df:
        raise MonitorError(f"{path}: no 'image_id' column (columns: {', '.join(map(str, df.columns))})")
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise MonitorError(f"{path}: image_id {dup.iloc[0]!r} appears more than once")
    if "age" in df:
        age = pd.to_numeric(df["age"], errors="coerce")
        bad = df.index[age.isna() & df["age"].notna()]
        if len(bad):
            raise MonitorError(f"{path}: row {bad[0] + 2}: field 'age' is not a number: {df['age'][bad[0]]!r}")
        df["age"] = age
    if "dx" in df and taxonomy is not None:
        known = set(taxonomy.classes("dx"))
        bad = df.index[df["dx"].notna() & ~df["dx"].isin(known)]
        if len(bad):
            raise MonitorError(f"{path}: row {bad[0] + 2}: field 'dx' has unknown diagnosis {df['dx'][bad[0]]!r} "
                               f"(known: {', '.join(sorted(known))})")
    return df


def current_from_folder(
    folder: Path | str,
    reference: Reference,
    predictor: Any,
    *,
    metadata_csv: Path | str | None = None,
    taxonomy: Any = None,
    workers: int = 0,
    chunk_size: int = 32,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[str]]:
    """The current batch of a folder of images (JPEG/PNG, any size) with an optional metadata CSV
    (labels in ``dx``). Returns the rows and the messages of skipped unreadable files."""
    paths = list_images(folder)
    meta = None
    if metadata_csv is not None:
        meta = read_metadata_csv(metadata_csv, taxonomy)
    meta_rows = None
    if meta is not None:
        ids = pd.DataFrame({"image_id": [p.stem for p in paths]})
        meta_rows = ids.merge(meta, on="image_id", how="left")
    frame, errors = compute_batch(
        paths, config=reference.feature_config, predictor=predictor, projection=reference.projection,
        metadata=meta_rows, tta=bool(reference.schema.get("tta", False)), batch_size=batch_size, workers=workers,
        chunk_size=chunk_size, progress=progress, desc="monitor")
    if meta is not None and len(frame):
        frame = frame.merge(meta, on="image_id", how="left", suffixes=("", "_meta"))
        if "dx" in frame and taxonomy is not None and frame["dx"].notna().any():
            level = reference.schema.get("native_level", "dx")
            frame["label"] = [taxonomy.labels([d], level)[0] if isinstance(d, str) else None for d in frame["dx"]]
    return frame, errors


def current_from_log(log_dir: Path | str, start: Any = None, end: Any = None) -> pd.DataFrame:
    """The current batch from the service's inference log for ``[start, end)``."""
    from pipeline import inferencelog

    return inferencelog.read(log_dir, start, end)


# ----------------------------------------------------------------------------------------------
# the check


def _prepare(frame: pd.DataFrame, num: list[str], cat: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(index=range(len(frame)))
    for c in num:
        out[c] = pd.to_numeric(frame[c], errors="coerce").astype(float).to_numpy()
    for c in cat:
        out[c] = frame[c].astype(object).where(frame[c].notna(), MISSING).astype(str).to_numpy()
    return out


def _usable(ref: pd.DataFrame, cur: pd.DataFrame, cols: Sequence[str]) -> tuple[list[str], list[str]]:
    """Columns present and not entirely missing in both frames; and the skipped ones."""
    ok, skipped = [], []
    for c in cols:
        if c in ref and c in cur and ref[c].notna().any() and cur[c].notna().any():
            ok.append(c)
        else:
            skipped.append(c)
    return ok, skipped


@contextlib.contextmanager
def _table_only_rendering():
    """Inside a ``DataDriftPreset`` the per-column ``ValueDrift`` widgets are computed and then
    discarded (the preset renders its own drift table); building those plotly figures is about half
    the report's time. Skip them while the preset runs (the values and tests are unaffected)."""
    try:
        from evidently.metrics.column_statistics import ValueDriftCalculation
    except ImportError:  # another Evidently layout: render as usual
        yield
        return
    original = ValueDriftCalculation.__dict__.get("_render")
    if original is None:
        yield
        return
    ValueDriftCalculation._render = lambda self, *args, **kwargs: []  # type: ignore[method-assign]
    try:
        yield
    finally:
        ValueDriftCalculation._render = original  # type: ignore[method-assign]


def _datasets(ref: pd.DataFrame, cur: pd.DataFrame, num: list[str], cat: list[str]) -> tuple[Any, Any]:
    from evidently import DataDefinition, Dataset

    dd = DataDefinition(numerical_columns=num, categorical_columns=cat)
    return (Dataset.from_pandas(_prepare(ref, num, cat), data_definition=dd),
            Dataset.from_pandas(_prepare(cur, num, cat), data_definition=dd))


def drift_report(
    ref: pd.DataFrame, cur: pd.DataFrame, num: list[str], cat: list[str], p: Any, drift_share: float,
    html: bool = True,
) -> tuple[Any, dict[str, dict[str, Any]], float]:
    """Evidently data drift over ``num + cat``: (snapshot, per-column results, drift share).

    Per column: Evidently's score, method, threshold and verdict, plus an effect size
    (:func:`effect_size`) used to rank the drifted columns. ``html=True``: the ``DataDriftPreset``
    (its drift table is the report a person reads); ``html=False``: the same per-column
    ``ValueDrift`` metrics and tests without any plots (the same verdicts, several times faster)."""
    from evidently import Report
    from evidently.metrics import DriftedColumnsCount, ValueDrift
    from evidently.presets import DataDriftPreset

    cols = num + cat
    r, c = _datasets(ref, cur, num, cat)
    if html:
        metrics: list[Any] = [DataDriftPreset(
            columns=cols, drift_share=drift_share, num_method=p.num_method, cat_method=p.cat_method,
            num_threshold=p.num_threshold, cat_threshold=p.cat_threshold)]
    else:
        metrics = [DriftedColumnsCount(columns=cols, drift_share=drift_share, num_method=p.num_method,
                                       cat_method=p.cat_method, num_threshold=p.num_threshold,
                                       cat_threshold=p.cat_threshold)]
        metrics += [ValueDrift(column=x, method=p.num_method, threshold=p.num_threshold) for x in num]
        metrics += [ValueDrift(column=x, method=p.cat_method, threshold=p.cat_threshold) for x in cat]
    with _table_only_rendering(), np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        snap = Report(metrics, include_tests=True).run(reference_data=r, current_data=c)
    res = column_results(snap.dict())
    min_effect = getattr(p, "min_effect", 0.0)
    for col in cols:
        if col in res:
            r = res[col]
            r["effect"] = effect_size(ref[col], cur[col], col in num)
            r["evidently_drifted"] = r["drifted"]
            if col in num:  # statistically *and* practically significant
                r["drifted"] = bool(r["drifted"] and (r["effect"] or 0.0) >= min_effect)
    return snap, res, share_of(res, cols)


def effect_size(ref: pd.Series, cur: pd.Series, numerical: bool) -> float | None:
    """How far the current distribution moved: for a numerical column the Wasserstein distance in
    units of the reference's standard deviation; for a categorical one the total variation distance."""
    if numerical:
        a = pd.to_numeric(ref, errors="coerce").dropna().to_numpy(dtype=float)
        b = pd.to_numeric(cur, errors="coerce").dropna().to_numpy(dtype=float)
        if not len(a) or not len(b):
            return None
        from scipy.stats import wasserstein_distance

        sd = float(a.std()) or 1.0
        return round(float(wasserstein_distance(a, b)) / sd, 4)
    pa = ref.astype(str).value_counts(normalize=True)
    pb = cur.astype(str).value_counts(normalize=True)
    keys = pa.index.union(pb.index)
    return round(0.5 * float((pa.reindex(keys, fill_value=0) - pb.reindex(keys, fill_value=0)).abs().sum()), 4)


def column_results(snapshot_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per column: Evidently's drift score, method, threshold and verdict (from its tests)."""
    status = {}
    for t in snapshot_dict.get("tests") or []:
        mc = t.get("metric_config") or {}
        if (mc.get("params") or {}).get("type") == "evidently:metric_v2:ValueDrift":
            status[mc.get("metric_id")] = t.get("status") == "FAIL"
    out: dict[str, dict[str, Any]] = {}
    for m in snapshot_dict.get("metrics") or []:
        cfg = m.get("config") or {}
        if cfg.get("type") != "evidently:metric_v2:ValueDrift":
            continue
        score = m.get("value")
        out[cfg["column"]] = {
            "score": None if score is None or (isinstance(score, float) and not math.isfinite(score)) else float(score),
            "method": cfg.get("method"), "threshold": cfg.get("threshold"),
            "drifted": bool(status.get(m.get("id"), False)),
        }
    return out


def share_of(results: Mapping[str, Mapping[str, Any]], cols: Sequence[str]) -> float:
    return sum(bool(results.get(c, {}).get("drifted")) for c in cols) / max(1, len(cols))


def _ranked(results: Mapping[str, Mapping[str, Any]], cols: Sequence[str]) -> list[str]:
    """Drifted columns, the largest effect size first."""
    drifted = [c for c in cols if results.get(c, {}).get("drifted")]
    return sorted(drifted, key=lambda c: -(results[c].get("effect") or 0.0))


def _stamp_dir(root: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out, k = root / stamp, 1
    while out.exists():
        out, k = root / f"{stamp}-{k}", k + 1
    return out


def run_check(
    reference: Reference,
    current: pd.DataFrame,
    p: Any,
    out_root: Path | str,
    source: Mapping[str, Any],
    skipped_images: Sequence[str] = (),
    html: bool = True,
) -> dict[str, Any]:
    """Run the Evidently reports and the decision; write everything under
    ``out_root/<UTC timestamp>/`` (HTML + JSON per report, ``summary.json``, ``summary.md``);
    return the summary (its ``report_dir`` says where). ``html=False`` writes the JSON results and
    the summary only (same decision, no plots: for tests and batch back-fills)."""
    from pipeline.lineage import lineage

    t0 = time.perf_counter()
    out_root = Path(out_root)
    final = _stamp_dir(out_root)
    cols = reference.columns
    ref = reference.frame
    n_cur = int(len(current))
    summary: dict[str, Any] = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": dict(source),
        "n_current": n_cur,
        "n_reference": int(len(ref)),
        "min_batch_size": int(p.min_batch_size),
        "reference": {"path": str(reference.path), "model": reference.schema.get("model"),
                      "data": ((reference.schema.get("lineage") or {}).get("data") or {}).get("md5")},
        "thresholds": {"num_method": p.num_method, "num_threshold": p.num_threshold, "cat_method": p.cat_method,
                       "cat_threshold": p.cat_threshold, "min_effect": p.min_effect, "drift_share": p.drift_share,
                       "key_features": list(p.key_features), "embedding_method": p.embedding_method,
                       "embedding_drift_share": p.embedding_drift_share,
                       "embedding_auc_threshold": p.embedding_auc_threshold},
        "skipped_images": list(skipped_images),
        "reports": {},
    }
    if "model_tag" in current and n_cur:
        summary["model_tags"] = sorted(map(str, current["model_tag"].dropna().unique()))
    with staged_dir(final) as stage:
        if n_cur < p.min_batch_size:
            summary.update(decision=NOT_ENOUGH_DATA, drift=None,
                           reason=f"not enough data: {n_cur} current image(s), fewer than min_batch_size "
                                  f"{p.min_batch_size}; no verdict")
        else:
            _evidently_reports(reference, current, p, stage, summary, html)
        summary["lineage"] = lineage(params={"monitor": dataclasses.asdict(p)})
        summary["elapsed_s"] = round(time.perf_counter() - t0, 2)
        summary["report_dir"] = str(final)
        write_json(stage / SUMMARY_FILE, summary)
        atomic_write_text(stage / "summary.md", summary_markdown(summary))
    return summary


def _evidently_reports(reference: Reference, current: pd.DataFrame, p: Any, stage: Path,
                       summary: dict[str, Any], html: bool = True) -> None:
    cols = reference.columns
    ref = reference.frame
    # 1. data drift over the feature table: image statistics + metadata
    num, skip_n = _usable(ref, current, cols["stat_numeric"] + cols["metadata_numeric"])
    cat, skip_c = _usable(ref, current, cols["stat_categorical"] + cols["metadata_categorical"])
    snap, res, share = drift_report(ref, current, num, cat, p, p.drift_share, html)
    _save(snap, stage, "data_drift", summary, html)
    feats = num + cat
    drifted = _ranked(res, feats)
    key_present = [k for k in p.key_features if k in feats]
    key_drifted = [k for k in key_present if res.get(k, {}).get("drifted")]
    summary.update(
        n_features=len(feats), drift_share=round(share, 4), drifted_columns=drifted,
        key_features_checked=key_present, key_features_drifted=key_drifted,
        columns_skipped=sorted(skip_n + skip_c),
        column_drift={c: res[c] for c in feats if c in res},
    )
    # 2. prediction drift: predicted class, probabilities, malignancy probability
    pnum, _ = _usable(ref, current, cols["prediction_numeric"])
    pcat, _ = _usable(ref, current, cols["prediction_categorical"])
    if pnum or pcat:
        snap, pres, pshare = drift_report(ref, current, pnum, pcat, p, p.drift_share, html)
        _save(snap, stage, "prediction_drift", summary, html)
        summary["prediction_drift"] = {
            "drift_share": round(pshare, 4), "drifted_columns": _ranked(pres, pnum + pcat), "columns": pres,
            "class_distribution": {
                "reference": _distribution(ref.get("pred_class")),
                "current": _distribution(current.get("pred_class")),
            },
        }
    # 3. embedding drift
    emb, _ = _usable(ref, current, cols["embedding"])
    summary["embedding_drift"] = _embedding_drift(ref, current, emb, p, stage, summary, html) if emb else None
    # 4. classification quality when the current batch has labels
    label = cols.get("label")
    if label and label in current and current[label].notna().any() and "pred_class" in current:
        summary["classification"] = _classification(reference, current, stage, summary, html)
    # the decision
    reasons = []
    if share >= p.drift_share:
        reasons.append(f"{len(drifted)} of {len(feats)} feature columns drifted (share {share:.2f} >= "
                       f"{p.drift_share})")
    if key_drifted:
        reasons.append(f"key feature(s) drifted: {', '.join(key_drifted)}")
    ed = summary["embedding_drift"]
    if ed and ed["drifted"]:
        reasons.append(f"embeddings drifted ({ed['method']}: {ed['score']:.3f} >= {ed['threshold']})")
    drift = bool(reasons)
    top = ", ".join(drifted[:8]) if drifted else "none"
    summary.update(
        decision=DRIFT if drift else NO_DRIFT, drift=drift,
        reason=("drift: " + "; ".join(reasons) + f". Most drifted: {top}") if drift else
        (f"no drift: {len(drifted)} of {len(feats)} feature columns drifted (share {share:.2f} < "
         f"{p.drift_share}), no key feature drifted"
         + (f", embeddings {ed['method']} {ed['score']:.3f} < {ed['threshold']}" if ed else "")),
    )


def _distribution(s: pd.Series | None) -> dict[str, float]:
    if s is None or not len(s):
        return {}
    return {str(k): round(float(v), 4) for k, v in s.value_counts(normalize=True).sort_index().items()}


def _save(snap: Any, stage: Path, name: str, summary: dict[str, Any], html: bool = True) -> None:
    if html:
        snap.save_html(str(stage / f"{name}.html"))
    snap.save_json(str(stage / f"{name}.json"))
    summary["reports"][name] = {"html": f"{name}.html" if html else None, "json": f"{name}.json"}


def _embedding_drift(ref: pd.DataFrame, cur: pd.DataFrame, emb: list[str], p: Any, stage: Path,
                     summary: dict[str, Any], html: bool = True) -> dict[str, Any]:
    if p.embedding_method == "share":
        snap, res, share = drift_report(ref, cur, emb, [], p, p.embedding_drift_share, html=False)
        _save(snap, stage, "embedding_drift", summary, html=False)  # 32 per-component plots help nobody
        drifted = _ranked(res, emb)
        return {"method": "share", "score": round(share, 4), "threshold": p.embedding_drift_share,
                "drifted": bool(share >= p.embedding_drift_share), "n_components": len(emb),
                "n_drifted_components": len(drifted), "drifted_components": drifted}
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.metrics.embeddings import ModelDriftMethod

    n = p.embedding_max_rows
    r = ref[emb].sample(min(n, len(ref)), random_state=0) if len(ref) > n else ref[emb]
    c = cur[emb].sample(min(n, len(cur)), random_state=0) if len(cur) > n else cur[emb]
    dd = DataDefinition(numerical_columns=emb, embeddings={"embeddings": emb})
    snap = Report([EmbeddingsDrift(embeddings_name="embeddings",
                                   drift_method=ModelDriftMethod(threshold=p.embedding_auc_threshold))]).run(
        reference_data=Dataset.from_pandas(r.reset_index(drop=True).astype(float), data_definition=dd),
        current_data=Dataset.from_pandas(c.reset_index(drop=True).astype(float), data_definition=dd))
    _save(snap, stage, "embedding_drift", summary, html)
    score = float(next(m["value"] for m in snap.dict()["metrics"]
                       if m["config"]["type"] == "evidently:metric_v2:EmbeddingsDrift"))
    return {"method": "model", "score": round(score, 4), "threshold": p.embedding_auc_threshold,
            "drifted": bool(score >= p.embedding_auc_threshold), "n_components": len(emb)}


def _classification(reference: Reference, current: pd.DataFrame, stage: Path, summary: dict[str, Any],
                    html: bool = True) -> dict:
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.presets import ClassificationPreset
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    classes = list(reference.schema["classes"])
    label = reference.columns["label"]
    probs = [f"{PROB_PREFIX}{c}" for c in classes]

    def frame(df: pd.DataFrame) -> pd.DataFrame:
        df = df[df[label].notna()]
        out = pd.DataFrame({"target": df[label].astype(str).to_numpy(),
                            "prediction": df["pred_class"].astype(str).to_numpy()})
        for c, pc in zip(classes, probs):
            out[c] = pd.to_numeric(df[pc]).to_numpy() if pc in df else np.nan
        return out

    r, c = frame(reference.frame), frame(current)
    dd = DataDefinition(categorical_columns=["target", "prediction"], numerical_columns=classes,
                        classification=[MulticlassClassification(target="target", prediction_labels="prediction",
                                                                 prediction_probas=classes)])
    report_error = None
    try:
        snap = Report([ClassificationPreset()]).run(reference_data=Dataset.from_pandas(r, data_definition=dd),
                                                    current_data=Dataset.from_pandas(c, data_definition=dd))
        _save(snap, stage, "classification", summary, html)
    except (KeyError, ValueError, IndexError) as exc:
        # Evidently 0.7's per-class quality metric fails when a class has no labelled image in the
        # current batch (KeyError on the class name): keep the scores below and say why the
        # report is missing instead of failing the whole drift check.
        absent = sorted(set(classes) - set(c["target"]))
        report_error = (f"Evidently classification report not produced ({type(exc).__name__}: {exc}); "
                        f"classes without a labelled image in the current batch: {', '.join(absent) or 'none'}")

    def scores(df: pd.DataFrame) -> dict[str, float]:
        return {"n": int(len(df)), "accuracy": round(float(accuracy_score(df["target"], df["prediction"])), 4),
                "balanced_accuracy": round(float(balanced_accuracy_score(df["target"], df["prediction"])), 4),
                "macro_f1": round(float(f1_score(df["target"], df["prediction"], average="macro",
                                                 labels=classes, zero_division=0)), 4)}

    out = {"reference": scores(r), "current": scores(c),
           "note": "reference scores are on training images (optimistic)"}
    if report_error:
        out["report_error"] = report_error
    return out


# ----------------------------------------------------------------------------------------------
# people-facing summary and the retraining rule


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """A short markdown summary (also the Prefect artifact of the monitoring flow)."""
    d = summary.get("decision")
    head = {DRIFT: "DRIFT DETECTED", NO_DRIFT: "no drift", NOT_ENOUGH_DATA: "not enough data"}.get(d, str(d))
    src = summary.get("source") or {}
    lines = [f"# lesionflow drift check: {head}", "", str(summary.get("reason", "")), "",
             "| | |", "|---|---|",
             f"| source | {src.get('kind')} `{src.get('path', '')}` {src.get('window', '')} |",
             f"| current images | {summary.get('n_current')} (minimum {summary.get('min_batch_size')}) |",
             f"| reference images | {summary.get('n_reference')} |"]
    if d != NOT_ENOUGH_DATA:
        lines.append(f"| feature drift share | {summary.get('drift_share')} "
                     f"(threshold {summary['thresholds']['drift_share']}, {summary.get('n_features')} columns) |")
        lines.append(f"| key features drifted | {', '.join(summary.get('key_features_drifted') or []) or 'none'} |")
        ed = summary.get("embedding_drift")
        if ed:
            lines.append(f"| embedding drift ({ed['method']}) | {ed['score']} (threshold {ed['threshold']}) |")
        pdr = summary.get("prediction_drift")
        if pdr:
            lines.append(f"| prediction drift | {', '.join(pdr['drifted_columns']) or 'none'} |")
        cl = summary.get("classification")
        if cl:
            lines.append(f"| balanced accuracy | current {cl['current']['balanced_accuracy']} "
                         f"(reference {cl['reference']['balanced_accuracy']}) |")
        th = summary.get("thresholds") or {}
        lines += ["", f"A numerical column counts as drifted when Evidently's {th.get('num_method')} test flags it "
                      f"(threshold {th.get('num_threshold')}) *and* it moved by at least {th.get('min_effect')} "
                      "reference standard deviations; the HTML drift table shows Evidently's test alone.",
                  "", "Most drifted columns (strongest first):", ""]
        cd = summary.get("column_drift") or {}
        for c in (summary.get("drifted_columns") or [])[:15]:
            r = cd.get(c, {})
            lines.append(f"- `{c}`: moved {r.get('effect')} (Wasserstein / reference std, or total variation); "
                         f"{r.get('method')} = {r.get('score'):.3g}, threshold {r.get('threshold')}"
                         if isinstance(r.get("score"), float) else f"- `{c}`")
        rd = summary.get("report_dir", "")
        lines += ["", "Reports: " + ", ".join(f"`{rd}/{v['html'] or v['json']}`"
                                              for v in (summary.get("reports") or {}).values())]
    if summary.get("skipped_images"):
        lines += ["", f"Skipped {len(summary['skipped_images'])} unreadable image(s): "
                      + "; ".join(summary["skipped_images"][:5])]
    return "\n".join(lines) + "\n"


def retrain_decision(summary: Mapping[str, Any], data_md5: str | None, champion_data_md5: str | None) -> dict[str, Any]:
    """What the monitoring flow does after a check: ``action`` is ``none`` (no drift or not enough
    data), ``retrain`` (drift, and the workspace's data version differs from the champion's: new
    labelled data was added) or ``alert`` (drift, but no new data to retrain on)."""
    if summary.get("decision") != DRIFT:
        return {"action": "none", "reason": summary.get("reason", "")}
    if not champion_data_md5:
        return {"action": "alert",
                "reason": "drift confirmed but there is no packaged champion whose data version could be compared "
                          "(run the retraining flow once: lesionflow run)"}
    if data_md5 and data_md5 != "unknown" and data_md5 != champion_data_md5:
        return {"action": "retrain",
                "reason": f"drift confirmed and a new data version is available (data.dvc md5 {data_md5}, "
                          f"champion trained on {champion_data_md5})"}
    return {"action": "alert",
            "reason": f"drift confirmed but no new labelled data (data.dvc md5 {data_md5} = the champion's): "
                      "label new images, add them as a new DVC data version (dvc add data), then retrain"}
