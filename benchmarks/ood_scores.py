"""Benchmark: which out-of-distribution score should the model ship with?

Side by side in one run, on the trained model (``artifacts/model``), the HAM10000 test split (in
distribution) and the non-dermoscopic images of :mod:`pipeline.evaluation.oodsets` (bundled
sample photographs and synthetic blanks/noise/screenshots):

* the baseline a user would otherwise write: the maximum softmax probability (Hendrycks & Gimpel
  2017), thresholded;
* the energy score (Liu et al. 2020) on the logits, with and without the fitted temperature;
* the Mahalanobis distance of the penultimate embedding to class-conditional Gaussians with a
  shared, Ledoit-Wolf shrunk covariance fitted on the training split (Lee et al. 2018), what
  :mod:`pipeline.model.ood` implements.

For each: AUROC (OOD images vs test images; per group and overall) and, at the threshold that
lets 99 % of the validation split pass, the share of OOD images caught and of test images
flagged. The temperature is fitted on val as the train stage does.

Run from the project root: ``python benchmarks/ood_scores.py`` -> benchmarks/results/ood_scores.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from pipeline.core import images, lineage, params  # noqa: E402
from pipeline.data import splits  # noqa: E402
from pipeline.evaluation import oodsets  # noqa: E402
from pipeline.model import calibration, ood  # noqa: E402
from pipeline.model.inference import load_model  # noqa: E402

OUT = ROOT / "benchmarks/results/ood_scores.json"
PASS_SHARE = 0.99


def predict_files(predictor, frame: pd.DataFrame, images_dir: Path, batch: int = 64) -> dict[str, np.ndarray]:
    files = splits.image_files(frame, images_dir, "benchmark")
    logits, emb = [], []
    for s in range(0, len(files), batch):
        out = predictor.predict([images.decode_rgb(f) for f in files[s : s + batch]], tta=False)
        logits.append(out["logits"][0])
        emb.append(out["embeddings"])
    return {"logits": np.concatenate(logits), "embeddings": np.concatenate(emb)}


def scores(method: str, pred: dict[str, np.ndarray], stats: dict, t: float) -> np.ndarray:
    z = pred["logits"]
    if method == "max_softmax (baseline)":
        return -calibration.probabilities(z).max(1)
    if method == "energy":
        return ood.energy(z, 1.0)
    if method == "energy (calibrated T)":
        return ood.energy(z, t)
    return ood.OodDetector("mahalanobis", np.inf, stats).score(pred["embeddings"], z)


def main() -> None:
    t0 = time.perf_counter()
    predictor = load_model(ROOT / "artifacts/model", device="cpu")
    predictor.temperature, predictor.ood = 1.0, None
    tax = params.load_taxonomy(ROOT / "params.yaml")
    level = predictor.native_level
    frames = splits.read_splits(ROOT / "artifacts/splits")
    data = {s: predict_files(predictor, frames[s], ROOT / "data/images") for s in ("train", "val", "test")}
    labels = {s: tax.encode(frames[s]["dx"], level) for s in data}
    others = oodsets.ood_images()
    out = predictor.predict([o.rgb for o in others], tta=False)
    data["ood"] = {"logits": out["logits"][0], "embeddings": out["embeddings"]}
    group = np.array([o.group for o in others])
    t = calibration.fit_temperature(data["val"]["logits"], labels["val"])
    stats = ood.mahalanobis_statistics(data["train"]["embeddings"], labels["train"])
    predicted = time.perf_counter() - t0
    rows = {}
    for method in ("max_softmax (baseline)", "energy", "energy (calibrated T)", "mahalanobis"):
        t1 = time.perf_counter()
        s = {k: scores(method, v, stats, t) for k, v in data.items() if k != "train"}
        thr = float(np.quantile(s["val"], PASS_SHARE, method="higher"))
        y = np.r_[np.zeros(len(s["test"])), np.ones(len(s["ood"]))]
        row = {"auroc_all": round(float(roc_auc_score(y, np.r_[s["test"], s["ood"]])), 4)}
        for g in ("photo", "synthetic"):
            m = group == g
            yg = np.r_[np.zeros(len(s["test"])), np.ones(m.sum())]
            row[f"auroc_{g}"] = round(float(roc_auc_score(yg, np.r_[s["test"], s["ood"][m]])), 4)
            row[f"caught_{g}"] = round(float(np.mean(s["ood"][m] > thr)), 4)
        row["test_flagged_share"] = round(float(np.mean(s["test"] > thr)), 4)
        row["missed"] = sorted(o.name for o, sc in zip(others, s["ood"]) if sc <= thr)[:20]
        row["score_seconds"] = round(time.perf_counter() - t1, 3)
        rows[method] = row
        print(method, {k: v for k, v in row.items() if k != "missed"})
    result = {
        "benchmark": "ood_scores",
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "machine": machine(),
        "model": str(ROOT / "artifacts/model"),
        "model_md5": lineage.file_md5(ROOT / "artifacts/model/model.pt"),
        "in_distribution": {s: len(frames[s]) for s in frames},
        "ood_images": {g: int((group == g).sum()) for g in ("photo", "synthetic")},
        "temperature": round(t, 4),
        "pass_share": PASS_SHARE,
        "predict_seconds": round(predicted, 1),
        "methods": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
