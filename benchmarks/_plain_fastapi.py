"""The baseline of benchmarks/serve_load.py: the plain FastAPI app a user would otherwise write to
serve the same packaged model, with the same engine (ONNX Runtime on its ``model.onnx``, the same
:func:`pipeline.model.runtime.load_packaged` predictor and thread count) and the same bearer-token
check, one image per request, no batching, no admission control, no inference log.
Run: LESIONFLOW_BENCH_MODEL_DIR=<packaged model dir> LESIONFLOW_BENCH_TOKEN=<token>
uvicorn benchmarks._plain_fastapi:app"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from fastapi import FastAPI, File, Header, HTTPException, UploadFile

from pipeline.core import images
from pipeline.model.runtime import load_packaged

MODEL_DIR = Path(os.environ["LESIONFLOW_BENCH_MODEL_DIR"])
TOKEN_SHA256 = hashlib.sha256(os.environ["LESIONFLOW_BENCH_TOKEN"].encode()).hexdigest()
predictor = load_packaged(MODEL_DIR)
threshold = float(json.loads((MODEL_DIR / "operating_point.json").read_text())["threshold"])
app = FastAPI()


@app.get("/ready")
def ready() -> dict:
    return {"ready": True}


@app.post("/classify")
def classify(image: UploadFile = File(...), authorization: str = Header("")) -> dict:
    token = authorization.removeprefix("Bearer ").strip()
    if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), TOKEN_SHA256):
        raise HTTPException(401, "a valid bearer token is required")
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
