"""Benchmark: time of the `validate` and `split` stages on the full data.

Side by side in one run:
* lesionflow's `validate` (Great Expectations contract + parallel full decode + md5 of every file)
  against the baseline a user would otherwise write: a serial loop that opens every image with PIL
  and calls `verify()` (header check only, catches fewer faults) plus a pandas `isin` check;
* lesionflow's `split` (lesion + duplicate grouping, stratified greedy) against scikit-learn's
  `GroupShuffleSplit` applied twice (grouped but not stratified).

Run from the project root: `python benchmarks/validate_split.py` -> benchmarks/results/validate_split.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from pipeline.core import params
from pipeline.data import contract, splitting

META = ROOT / "data/HAM10000_metadata.csv"
IMAGES = ROOT / "data/images"


def timed(fn, repeat=3):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def baseline_validate():
    df = pd.read_csv(META)
    bad = 0
    assert df["dx"].isin(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]).all()
    for image_id in df["image_id"]:
        with Image.open(IMAGES / f"{image_id}.jpg") as img:
            img.verify()
    return bad


def baseline_split(df):
    from sklearn.model_selection import GroupShuffleSplit

    outer = GroupShuffleSplit(n_splits=1, test_size=0.30, random_state=42)
    train_idx, rest_idx = next(outer.split(df, groups=df["lesion_id"]))
    rest = df.iloc[rest_idx]
    inner = GroupShuffleSplit(n_splits=1, test_size=0.50, random_state=42)
    val_idx, test_idx = next(inner.split(rest, groups=rest["lesion_id"]))
    out = df.assign(split="train")
    out.loc[rest.index[val_idx], "split"] = "val"
    out.loc[rest.index[test_idx], "split"] = "test"
    return out


def main() -> None:
    vp = params.load_section("validate", ROOT / "params.yaml")
    mp = params.load_section("metadata", ROOT / "params.yaml")
    sp = params.load_section("split", ROOT / "params.yaml")
    dx = params.load_taxonomy(ROOT / "params.yaml").diagnoses
    # import Great Expectations once, outside the timing of later repeats, but count its import
    t0 = time.perf_counter()
    import great_expectations  # noqa: F401

    ge_import = time.perf_counter() - t0
    t_ours, result = timed(lambda: contract.validate(META, IMAGES, vp, mp, dx, progress=False), repeat=3)
    assert result.passed
    t_base, _ = timed(baseline_validate, repeat=3)
    meta = pd.read_csv(META, dtype=str)
    t_split, df = timed(lambda: splitting.make_split(meta, result.index, sp), repeat=5)
    t_split_base, base = timed(lambda: baseline_split(meta), repeat=5)
    target = pd.Series({"train": 0.7, "val": 0.15, "test": 0.15})
    deviation = lambda d: round(
        float((pd.crosstab(d["dx"], d["split"], normalize="index") - target).abs().to_numpy().max()), 4
    )  # noqa: E731
    figures = {
        "machine": machine(),
        "images": len(meta),
        "validate": {
            "lesionflow_seconds": round(t_ours, 2),
            "lesionflow_plus_ge_import_seconds": round(t_ours + ge_import, 2),
            "great_expectations_import_seconds": round(ge_import, 2),
            "baseline_pil_verify_seconds": round(t_base, 2),
            "note": "lesionflow fully decodes and hashes every file and runs the GE suite; "
            "the baseline only verifies headers",
        },
        "split": {
            "lesionflow_seconds": round(t_split, 3),
            "baseline_groupshufflesplit_seconds": round(t_split_base, 3),
            "lesionflow_max_class_share_deviation": deviation(df),
            "baseline_max_class_share_deviation": deviation(base),
        },
        "targets": {"validate_seconds": 15, "split_seconds": 2},
    }
    out = ROOT / "benchmarks/results/validate_split.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
