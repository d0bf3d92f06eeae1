"""The baseline of benchmarks/serve_load.py: the plain FastAPI + torch app a user would otherwise
write to serve the same model (same pipeline.model.inference predictor, one image per request, no
batching). Run: LESIONFLOW_BENCH_MODEL_DIR=<model dir> uvicorn benchmarks._plain_fastapi:app"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, UploadFile

from pipeline.core import images
from pipeline.model.inference import load_model

MODEL_DIR = Path(os.environ["LESIONFLOW_BENCH_MODEL_DIR"])
predictor = load_model(MODEL_DIR, device="cpu", engine="torch")  # what a user would write: torch
threshold = float(json.loads((MODEL_DIR / "operating_point.json").read_text())["threshold"])
app = FastAPI()


@app.get("/ready")
def ready() -> dict:
    return {"ready": True}


@app.post("/classify")
def classify(image: UploadFile = File(...)) -> dict:
    try:
        rgb = images.decode_rgb(image.file.read(), "image")
    except images.ImageError as exc:
        raise HTTPException(400, str(exc)) from None
    out = predictor.predict([rgb])
    p = float(out["p_malignant"][0])
    return {
        "dx_probabilities": dict(zip(out["classes"]["dx"], out["dx_probs"][0].tolist())),
        "risk_probabilities": dict(zip(out["classes"]["risk"], out["risk_probs"][0].tolist())),
        "p_malignant": p,
        "refer": p >= threshold,
    }
