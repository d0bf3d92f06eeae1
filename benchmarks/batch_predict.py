"""Benchmark: batch inference of a folder, one process against a local Dask cluster.

Side by side in one run, on the same images and the trained model (``artifacts/model``):

* the baseline a user would otherwise run: ``lesionflow predict`` in one process
  (:func:`pipeline.model.batchpredict.predict_files`, all cores to torch/ONNX Runtime);
* ``lesionflow predict --dask-workers 2``: the files sharded over a local Dask cluster of two
  worker processes, one thread each (:mod:`flows.predict`), cluster start-up included.

Both must give the same rows. Reports images/s and wall seconds.

Run from the project root: ``python benchmarks/batch_predict.py [--images N]`` -> benchmarks/results/batch_predict.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from flows.predict import predict_on_dask  # noqa: E402
from pipeline.core import lineage  # noqa: E402
from pipeline.model import batchpredict  # noqa: E402
from pipeline.model.inference import load_model  # noqa: E402

OUT = ROOT / "benchmarks/results/batch_predict.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    model = ROOT / "artifacts/model"
    files = sorted((ROOT / "data/images").glob("ISIC_*.jpg"))[: a.images]
    t0 = time.perf_counter()
    one, _ = batchpredict.predict_files(load_model(model, device="cpu"), files, 0.5, a.batch_size, progress=False)
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    many, _ = predict_on_dask(model, files, 0.5, a.batch_size, workers=a.workers, shard_size=128)
    dask = time.perf_counter() - t0
    numeric = [c for c in one.columns if c.startswith("p_")]
    same = list(one["file"]) == list(many["file"]) and bool(
        np.allclose(one[numeric].to_numpy(float), many[numeric].to_numpy(float), atol=1e-5)
    )
    result = {
        "benchmark": "batch_predict",
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "machine": machine(),
        "model_md5": lineage.file_md5(model / "model.pt"),
        "images": len(files),
        "single_process": {"seconds": round(single, 1), "images_per_s": round(len(files) / single, 1)},
        f"dask_{a.workers}_workers": {
            "seconds": round(dask, 1),
            "images_per_s": round(len(files) / dask, 1),
            "includes": "local cluster start-up and one model load per worker",
        },
        "identical_rows": same,
    }
    print(json.dumps(result, indent=2))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
