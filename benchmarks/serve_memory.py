"""Benchmark: the memory of one service replica (every process of it), idle, under 32 clients and
under a hostile corpus; the service as it is against the same service answering with torch.

Side by side in one run (one server at a time, same packaged model, same images, same load):
* ``onnx``: lesionflow's Bento service as shipped: the worker answers with ONNX Runtime on the
  packaged ``model.onnx`` and never imports torch (:func:`pipeline.model.runtime.load_packaged`);
* ``torch``: the same service with ``LESIONFLOW_ENGINE=torch``: the worker loads the torch model
  (what every worker did before the model was packaged with its ONNX graph), Grad-CAM by autograd
  (in the Grad-CAM process, which loads the torch model too).

For each, the resident set size (RSS) of every process of the replica, by role (BentoML's
``server`` process, the model ``worker``, the inference log's ``writer``, the ``gradcam`` process
once ``/gradcam`` was called), sampled every 50 ms:
* ``idle``: after start-up, a warm-up request and 5 s of quiet;
* ``hostile`` (next): peak while 8 clients send, three times over, few-KB PNGs declaring 48 MP to
  ``/classify``, ``/gradcam`` and ``/classify_batch`` (a batch over the pixel budget, one within),
  and the largest ``/infer`` body plus one over it; with the status codes answered;
* ``load_32_clients`` (last): peak and mean while 32 clients post real JPEGs to ``/classify`` back
  to back (30 s), with the requests/s and latencies of that load.

Authentication is on (a bearer token on every request). Run from the project root:
``python benchmarks/serve_memory.py`` -> benchmarks/results/serve_memory.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from benchmarks.serve_load import (  # noqa: E402
    free_port,
    load,
    load_arguments,
    packaged_service,
    real_blobs,
    start,
    stop,
)
from pipeline.core.fsutil import write_json  # noqa: E402
from pipeline.registry import bento as bentos  # noqa: E402
from tests.service_fixtures import process_roles  # noqa: E402

OUT = ROOT / "benchmarks/results/serve_memory.json"
MB = 1 << 20


class Sampler:
    """RSS of every process of the replica by role, every ``every`` seconds, in a thread."""

    def __init__(self, pid: int, every: float = 0.05):
        self.pid, self.every = pid, every
        self.samples: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> dict[str, int]:
        import psutil

        out = {}
        for role, pids in process_roles(self.pid).items():
            total = 0
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    total += psutil.Process(pid).memory_info().rss
            out[role] = total
        out["replica"] = sum(out.values())
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.snapshot())
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, dict[str, float]]:
        keys = ("server", "worker", "writer", "gradcam", "replica")
        return {
            "peak_mb": {k: round(max(s[k] for s in self.samples) / MB, 1) for k in keys},
            "mean_mb": {k: round(float(np.mean([s[k] for s in self.samples])) / MB, 1) for k in keys},
            "samples": len(self.samples),
        }


def blank_png(w: int = 8000, h: int = 6000) -> bytes:
    """A few-KB PNG declaring ``w`` x ``h`` pixels (48 MP: the largest image the service accepts)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (128, 90, 80)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def hostile(base: str, token: str, small: bytes) -> dict[str, dict[str, int]]:
    """The hostile corpus (see the module docstring), 8 clients, three rounds; status counts per request."""
    import httpx

    from pipeline.serving.guard import MAX_INFER_BYTES

    big = blank_png()
    infer_max = b'{"items": [' + b" " * (MAX_INFER_BYTES - 20) + b"]}"
    infer_over = b'{"items": [' + b" " * MAX_INFER_BYTES + b"]}"
    png, jpeg = ("big.png", big, "image/png"), ("small.jpg", small, "image/jpeg")
    cases = {
        "classify 48 MP PNG": ("/classify", {"files": {"image": png}}),
        "gradcam 48 MP PNG": ("/gradcam", {"files": {"image": png}}),
        "classify raw 48 MP PNG body": ("/classify", {"content": big, "headers": {"content-type": "image/png"}}),
        "classify_batch 16 x 48 MP": ("/classify_batch", {"files": [("image", png)] * 16}),
        "classify_batch 48 MP + JPEG": ("/classify_batch", {"files": [("image", png), ("image", jpeg)]}),
        "infer largest body": ("/infer", {"content": infer_max, "headers": {"content-type": "application/json"}}),
        "infer body over the cap": ("/infer", {"content": infer_over, "headers": {"content-type": "application/json"}}),
    }
    auth = {"Authorization": f"Bearer {token}"}

    def send(name: str) -> tuple[str, str]:
        path, kwargs = cases[name]
        kwargs = dict(kwargs)
        headers = {**auth, **kwargs.pop("headers", {})}
        try:
            with httpx.Client(base_url=base, timeout=120) as c:
                return name, str(c.post(path, headers=headers, **kwargs).status_code)
        except httpx.HTTPError as exc:  # a refused body may end the connection
            return name, type(exc).__name__

    counts: dict[str, dict[str, int]] = {name: {} for name in cases}
    with ThreadPoolExecutor(8) as pool:
        for name, status in pool.map(send, [n for _ in range(3) for n in cases]):
            counts[name][status] = counts[name].get(status, 0) + 1
    return counts


def measure(name: str, env: dict, tmp: Path, blobs: list[bytes], token: str, a: argparse.Namespace) -> dict:
    """Start the Bento with ``env``, then idle, load and hostile figures; the server is stopped after."""
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(bentos.serve_command(port=port), env, f"{base}/readyz", tmp / f"{name}.log")
    auth = {"Authorization": f"Bearer {token}"}
    try:
        r = httpx.post(f"{base}/classify", files={"image": ("w.jpg", blobs[0], "image/jpeg")}, headers=auth, timeout=60)
        r.raise_for_status()
        time.sleep(5.0)
        sampler = Sampler(proc.pid)
        idle = sampler.snapshot()
        engine = httpx.get(f"{base}/model", headers=auth, timeout=30).json().get("engine")
        with Sampler(proc.pid) as under_attack:
            statuses = hostile(base, token, blobs[0])
        time.sleep(2.0)
        between = sampler.snapshot()
        with Sampler(proc.pid) as under_load:
            served = asyncio.run(load(f"{base}/classify", blobs, a.clients, a.duration, a.warmup, token))
        after = sampler.snapshot()
    finally:
        stop(proc)
    lat = served.get("latency_ms", {})
    print(
        f"[{name}] engine {engine}: idle {idle['replica'] / MB:.0f} MB; 32 clients peak "
        f"{under_load.summary()['peak_mb']['replica']:.0f} MB ({served['requests_per_s']} req/s, p99 "
        f"{lat.get('p99')} ms); hostile peak worker {under_attack.summary()['peak_mb']['worker']:.0f} MB",
        flush=True,
    )
    return {
        "engine": engine,
        "idle_mb": {k: round(v / MB, 1) for k, v in idle.items()},
        "load_32_clients": {**under_load.summary(), "served": served},
        "hostile": {
            **under_attack.summary(),
            "worker_rise_over_idle_mb": round(under_attack.summary()["peak_mb"]["worker"] - idle["worker"] / MB, 1),
            "status_counts": statuses,
        },
        "after_hostile_mb": {k: round(v / MB, 1) for k, v in between.items()},
        "after_load_mb": {k: round(v / MB, 1) for k, v in after.items()},
    }


def memory_table(result: dict) -> str:
    """docs/security.md's table: a replica's memory idle, under load and under the hostile corpus,
    ONNX Runtime against torch (tools/figures.py checks the doc's copy against this JSON)."""

    def mb(v: float) -> str:
        return f"{v:,.0f} MB"

    lines = [
        "| | idle | peak under 32 clients | peak under the hostile corpus (worker's rise over idle) |",
        "|---|---|---|---|",
    ]
    for engine, label in (
        ("onnx", "as shipped (ONNX Runtime)"),
        ("torch", "the same service with `LESIONFLOW_ENGINE=torch`"),
    ):
        r = result["results"][engine]
        lines.append(
            f"| {label} | {mb(r['idle_mb']['replica'])} | {mb(r['load_32_clients']['peak_mb']['replica'])} | "
            f"{mb(r['hostile']['peak_mb']['replica'])} ({mb(r['hostile']['worker_rise_over_idle_mb'])}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = load_arguments(__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="onnx,torch", help="comma-separated: onnx (as shipped), torch")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)

    blobs = real_blobs(a.images_dir, a.images)
    tmp = Path(tempfile.mkdtemp(prefix="serve_memory-"))
    results: dict[str, dict] = {}
    try:
        env, model_info, tag, stored, token = packaged_service(tmp)
        for name in a.engines.split(","):
            if name not in ("onnx", "torch"):
                raise SystemExit(f"unknown engine {name!r} (onnx, torch)")
            engine_env = {**env, "LESIONFLOW_WORKERS": "1", "LESIONFLOW_ENGINE": "auto" if name == "onnx" else "torch"}
            results[name] = measure(name, engine_env, tmp, blobs, token, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "benchmark": "serve_memory",
        "machine": machine(),
        "model": {**model_info, "tag": tag},
        "replica": "bentoml serve, 1 worker, inference log on (its writer process), authentication on",
        "load": {"clients": a.clients, "duration_s": a.duration, "warmup_s": a.warmup, "images": len(blobs)},
        "results": results,
        "targets": {
            name: {
                "idle_replica_at_most_600_mb": r["idle_mb"]["replica"] <= 600,
                "replica_under_32_clients_at_most_900_mb": r["load_32_clients"]["peak_mb"]["replica"] <= 900,
                "hostile_worker_rise_at_most_300_mb": r["hostile"]["worker_rise_over_idle_mb"] <= 300,
            }
            for name, r in results.items()
        },
        "stored_model": str(stored.name),
    }
    write_json(a.out, out)
    print(f"-> {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
