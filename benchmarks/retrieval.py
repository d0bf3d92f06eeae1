"""Benchmark: similar confirmed cases, query latency and what they cost the service.

Side by side in one run, on the trained model and its full retrieval index (``artifacts/model``,
``artifacts/retrieval``: every training image):

1. query latency per image (p50/p99, one query at a time, the test split's embeddings): lesionflow's
   :meth:`pipeline.model.retrieval.RetrievalIndex.query` (one matrix product, partial sort, one
   case per lesion) against the baseline a user would otherwise write, scikit-learn's
   ``NearestNeighbors(metric="cosine", algorithm="brute")`` with the same per-lesion filtering;
   both must return the same cases;
2. the service under 32 concurrent clients (``benchmarks/serve_load.py``): ``/classify`` and
   ``/classify?similar=6``, the same Bento, one after the other.

Run from the project root: ``python benchmarks/retrieval.py`` -> benchmarks/results/retrieval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks import serve_load  # noqa: E402
from benchmarks._machine import machine  # noqa: E402
from pipeline.core import images, lineage  # noqa: E402
from pipeline.data import splits  # noqa: E402
from pipeline.model.inference import load_model  # noqa: E402
from pipeline.model.retrieval import RetrievalIndex  # noqa: E402

OUT = ROOT / "benchmarks/results/retrieval.json"


def sklearn_query(nn, index: RetrievalIndex, q: np.ndarray, k: int) -> list[str]:
    """The baseline: scikit-learn's brute-force cosine neighbours, then one case per lesion."""
    dist, idx = nn.kneighbors(q[None, :], n_neighbors=min(len(index), k * 8))
    seen, out = set(), []
    for i in idx[0]:
        lesion = index.cases["lesion_id"][int(i)]
        if lesion not in seen:
            seen.add(lesion)
            out.append(str(index.cases["image_id"][int(i)]))
            if len(out) == k:
                break
    return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def main(argv: list[str] | None = None) -> int:
    from sklearn.neighbors import NearestNeighbors

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=500, help="test images queried one at a time")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load per service variant")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    model_dir = ROOT / "artifacts/model"
    index = RetrievalIndex.load(ROOT / "artifacts/retrieval", model_md5=lineage.file_md5(model_dir / "model.pt"))
    test = splits.read_split(ROOT / "artifacts/splits", "test").head(a.queries)
    files = splits.image_files(test, ROOT / "data/images", "test")
    predictor = load_model(model_dir, device="cpu")
    emb = predictor.predict([images.decode_rgb(f) for f in files], tta=False)["embeddings"]
    nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(index.vectors)
    ours, base, same = [], [], 0
    for q in emb:
        t = time.perf_counter()
        got = [c.image_id for c in index.query(q, a.k)[0]]
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = sklearn_query(nn, index, q / np.linalg.norm(q), a.k)
        base.append(time.perf_counter() - t)
        same += got == ref
    query = {
        "index_size": len(index),
        "dim": int(index.vectors.shape[1]),
        "queries": len(emb),
        "k": a.k,
        "lesionflow": percentiles(ours),
        "sklearn_brute_cosine": percentiles(base),
        "identical_results": same,
    }
    print("query latency:", json.dumps(query))
    with tempfile.TemporaryDirectory() as tmp:
        load_out = Path(tmp) / "serve.json"
        serve_load.main(["--servers", "bento,bento-similar", "--duration", str(a.duration), "--out", str(load_out)])
        served = json.loads(load_out.read_text())
    result = {
        "benchmark": "retrieval",
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "machine": machine(),
        "model_md5": lineage.file_md5(model_dir / "model.pt"),
        "query": query,
        "service": {
            "load": served.get("load"),
            **{name: served["results"][name] for name in ("bento", "bento-similar") if name in served["results"]},
        },
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
