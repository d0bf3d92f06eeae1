"""Benchmark: serving under a bounded load on 127.0.0.1, the BentoML service against the plain app.

Side by side in one run (one server at a time, same model, same images, same load):
* lesionflow's Bento service (``pipeline.serving.service``: decode in request threads, adaptive batching
  of the model calls across requests), served by ``bentoml serve``;
* the same service with its inference log turned off (``bento-log-off``,
  ``LESIONFLOW_INFERENCE_LOG=off``): what the log costs under this load;
* the baseline a user would otherwise write: a plain FastAPI app (``benchmarks/_plain_fastapi.py``)
  calling the same predictor (ONNX Runtime on the packaged ``model.onnx``, same threads) once per
  request, served by uvicorn.

Authentication is on for both: every request carries a bearer token that the server checks (the
Bento against its tokens file, ``$LESIONFLOW_API_TOKENS_FILE``; the plain app against the same
token's sha256).

Load: ``--clients`` concurrent clients (default 32), each sending one real JPEG per request as a
multipart upload, back to back, for ``--duration`` seconds (default 30) after a warm-up. Reported
per server: requests/s, latency p50/p95/p99/max, error count (non-200 or failed requests), and
for the Bento the mean adaptive batch size.

The model: ``artifacts/model`` when it exists (the trained default), else a freshly initialised
model with params.yaml's train backbone/input size/TTA (same compute cost). It is packaged with
``pipeline.registry.package.package`` into a temporary BENTOML_HOME (synthetic gate files: the threshold
does not change the cost).

Run from the project root: ``python benchmarks/serve_load.py`` -> benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from pipeline.core import params
from pipeline.core.fsutil import write_json  # noqa: E402
from pipeline.model import bundle  # noqa: E402
from pipeline.registry import bento as bentos  # noqa: E402
from pipeline.registry import champions  # noqa: E402
from pipeline.registry import package as packaging  # noqa: E402
from tests.registry_fixtures import write_evaluation, write_model_dir  # noqa: E402

OUT = ROOT / "benchmarks/results/serve_load.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_model(tmp: Path, tta: str = "config") -> tuple[Path, dict]:
    trained = ROOT / "artifacts/model"
    train = params.load_section("train", ROOT / "params.yaml")
    if (trained / "config.json").exists() and (trained / "model.pt").exists():
        model_dir = tmp / "model"
        shutil.copytree(trained, model_dir)
        source = "artifacts/model (trained)"
    else:
        model_dir = write_model_dir(
            tmp / "model",
            backbone=train.backbone,
            input_size=tuple(train.input_size),
            metadata_fusion=train.metadata_fusion,
            tta=train.tta,
        )
        source = "freshly initialised (artifacts/model absent): same architecture, input size and TTA as params.yaml"
    cfg = json.loads((model_dir / "config.json").read_text())
    if tta in ("on", "off"):  # serve the same weights with/without flip TTA (config.json's inference.tta)
        cfg.setdefault("inference", {})["tta"] = tta == "on"
        write_json(model_dir / "config.json", cfg)
    write_evaluation(model_dir, tmp / "evaluate", tmp / "reports", threshold=0.5)
    return model_dir, {
        "source": source,
        "backbone": cfg["architecture"]["backbone"],
        "input_size": cfg["architecture"]["input_size"],
        "tta": bool(cfg.get("inference", {}).get("tta", False)),
        "metadata_fusion": bool(cfg["architecture"].get("metadata")),
    }


def real_blobs(images_dir: Path, n: int) -> list[bytes]:
    """The bytes of the first ``n`` HAM10000 JPEGs of ``images_dir`` (exits 2 when there are none)."""
    paths = sorted(Path(images_dir).glob("ISIC_*.jpg"))[:n]
    if not paths:
        print("data/images is empty: pull the data first (dvc pull)", file=sys.stderr)
        raise SystemExit(2)
    return [p.read_bytes() for p in paths]


def packaged_service(tmp: Path, tta: str = "config") -> tuple[dict, dict, str, Path, str]:
    """The model packaged into a BENTOML_HOME under ``tmp`` (:func:`prepare_model`), a tokens file with
    one token, and the environment a server of it runs with (inference log on, under ``tmp``).
    Returns (environment, model info, tag, stored model folder, token)."""
    home = tmp / "bentoml"
    os.environ["BENTOML_HOME"] = str(home)
    model_dir, model_info = prepare_model(tmp, tta)
    tag = packaging.package(model_dir, tmp / "evaluate", tmp / "reports", project_root=ROOT)
    stored = Path(champions.champion()["path"])
    tokens, token = bench_token(tmp)
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONUNBUFFERED": "1",
        "LESIONFLOW_API_TOKENS_FILE": str(tokens),
        # the inference log is on, as in production, but kept out of the project's own log
        "LESIONFLOW_INFERENCE_LOG": os.environ.get("LESIONFLOW_INFERENCE_LOG", str(tmp / "inference-log")),
    }
    env.pop("LESIONFLOW_MODEL_TAG", None)
    return env, {**model_info, "model_md5": bundle.model_md5(stored)}, tag, stored, token


def start(cmd: list[str], env: dict, ready_url: str, log: Path, timeout: float = 180) -> subprocess.Popen:
    import httpx

    fh = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{cmd[:4]}: not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def model_only(stored: Path, seconds: float = 5.0) -> dict:
    """The ceiling of any server of this model on this machine: the packaged model's own predictor
    (ONNX Runtime, every core), images/s on batches of 1 and 16 images already at its input size,
    nothing else running."""
    from pipeline.model.runtime import load_packaged

    predictor = load_packaged(stored)
    h, w = predictor.input_size
    rng = np.random.default_rng(0)
    out = {}
    for batch in (1, 16):
        x = rng.integers(0, 256, (batch, 3, h, w), dtype=np.uint8)
        predictor.predict(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            predictor.predict(x)
            n += batch
        out[f"batch_{batch}_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
    return out


def bench_token(tmp: Path) -> tuple[Path, str]:
    """A tokens file holding one new token (:func:`pipeline.serving.auth.add`), and the token."""
    from pipeline.serving import auth

    path = tmp / "api-tokens"
    return path, auth.add(path, "benchmark")


async def load(
    url: str,
    blobs: list[bytes],
    clients: int,
    duration: float,
    warmup: float,
    token: str = "",
    answered: list[str] | None = None,
) -> dict:
    """``clients`` concurrent clients posting images back to back (with ``token`` as their bearer
    token); stats of the measured window. ``answered``: collects the ``request_id`` of every 200
    answer (warm-up included)."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    counter = iter(range(10**9))

    async def client(session: aiohttp.ClientSession) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            i = next(counter)
            form = aiohttp.FormData()
            form.add_field("image", blobs[i % len(blobs)], filename=f"{i}.jpg", content_type="image/jpeg")
            try:
                async with session.post(url, data=form) as resp:
                    body = await resp.read()
                    status = str(resp.status)
                if answered is not None and status == "200":
                    answered.append(json.loads(body)["request_id"])
            except Exception as exc:  # noqa: BLE001 - counted as an error
                status = type(exc).__name__
            t1 = time.perf_counter()
            if t0 >= t_measure:
                latencies.append(t1 - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if status != "200" and len(errors) < 5:
                    errors.append(status)

    conn = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=headers) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    wall = time.perf_counter() - t_measure  # includes the tail of requests started in the window
    lat = np.array(latencies) * 1000
    ok = statuses.get("200", 0)
    return {
        "requests": int(len(lat)),
        "ok": int(ok),
        "errors": int(len(lat) - ok),
        "status_counts": statuses,
        "error_examples": errors,
        "requests_per_s": round(ok / wall, 2),
        "latency_ms": {q: round(float(np.percentile(lat, p)), 1) for q, p in (("p50", 50), ("p95", 95), ("p99", 99))}
        | {"max": round(float(lat.max()), 1), "mean": round(float(lat.mean()), 1)}
        if len(lat)
        else {},
        "measured_s": round(wall, 2),
    }


def bento_info(base: str, token: str) -> dict:
    """The service's own counters after the load: adaptive batching, the inference engine, and the
    inference log (records written vs dropped while saturated)."""
    import httpx

    try:
        info = httpx.get(f"{base}/model", timeout=10, headers={"Authorization": f"Bearer {token}"}).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {k: info.get(k) for k in ("batching", "engine", "inference_log")}


def load_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a load: clients, duration, warm-up and the images cycled through."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--images", type=int, default=64, help="distinct real images cycled through")
    ap.add_argument("--images-dir", type=Path, default=ROOT / "data/images")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = load_arguments(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--servers",
        default="bento,bento-log-off,plain",
        help="comma-separated: bento, bento-log-off (its inference log off), bento-wN (N workers), "
        "bento-similar (/classify?similar=6), plain",
    )
    ap.add_argument(
        "--tta",
        choices=("config", "on", "off"),
        default="config",
        help="flip TTA as the model's config says (default), or forced on/off",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--logs-dir", type=Path, default=None, help="keep the servers' logs here")
    a = ap.parse_args(argv)

    blobs = real_blobs(a.images_dir, a.images)
    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    results: dict[str, dict] = {}
    try:
        env, model_info, tag, stored, token = packaged_service(tmp, a.tta)
        env["LESIONFLOW_BENCH_TOKEN"] = token
        ceiling = model_only(stored)
        print(f"[model only] {ceiling}", flush=True)
        for name in a.servers.split(","):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            route = "/classify"
            if name == "bento-similar":  # the same service, each answer with the 6 most similar cases
                cmd = bentos.serve_command(port=port)
                env = {**env, "LESIONFLOW_WORKERS": "1"}
                ready, route = f"{base}/readyz", "/classify?similar=6"
            elif name in ("bento", "bento-log-off") or name.startswith("bento-w"):  # bento-wN: N worker processes
                cmd = bentos.serve_command(port=port)
                env = {**env, "LESIONFLOW_WORKERS": name[len("bento-w") :] if name.startswith("bento-w") else "1"}
                ready = f"{base}/readyz"
            elif name == "plain":
                cmd = [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "benchmarks._plain_fastapi:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                    "--log-level",
                    "warning",
                ]
                env = {**env, "LESIONFLOW_BENCH_MODEL_DIR": str(stored)}
                ready = f"{base}/ready"
            else:
                raise SystemExit(f"unknown server {name!r} (bento, bento-log-off, bento-wN, bento-similar, plain)")
            print(f"[{name}] starting: {' '.join(cmd[2:])}", flush=True)
            t0 = time.perf_counter()
            # the log is off for this server alone (env carries over to the servers after it)
            run_env = {**env, "LESIONFLOW_INFERENCE_LOG": "off"} if name == "bento-log-off" else env
            proc = start(cmd, run_env, ready, tmp / f"{name}.log")
            startup = time.perf_counter() - t0
            try:
                load_before = os.getloadavg()
                print(
                    f"[{name}] ready in {startup:.1f} s; {a.clients} clients x {a.duration:.0f} s "
                    f"(+{a.warmup:.0f} s warm-up)",
                    flush=True,
                )
                res = asyncio.run(load(f"{base}{route}", blobs, a.clients, a.duration, a.warmup, token))
                res["route"] = route
                res["startup_s"] = round(startup, 1)
                res["loadavg_1m_before"] = round(load_before[0], 2)
                res["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
                if name.startswith("bento"):
                    res.update(bento_info(base, token))
            finally:
                stop(proc)
            results[name] = res
            lat = res.get("latency_ms", {})
            print(
                f"[{name}] {res['requests_per_s']} req/s, p50 {lat.get('p50')} ms, p95 {lat.get('p95')} ms, "
                f"p99 {lat.get('p99')} ms, errors {res['errors']}/{res['requests']}",
                flush=True,
            )
    finally:
        if a.logs_dir is not None:
            a.logs_dir.mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("*.log"):
                shutil.copy2(log, a.logs_dir / log.name)
        shutil.rmtree(tmp, ignore_errors=True)

    out = {
        "benchmark": "serve_load",
        "machine": machine(),
        "model": {**model_info, "tag": tag},
        "load": {
            "clients": a.clients,
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "images": len(blobs),
            "request": "POST /classify, multipart field 'image', one 150x200 JPEG (HAM10000), bearer token",
            "client": "aiohttp, same machine",
            "authentication": "on for both servers (bearer token checked on every request)",
        },
        "model_only": ceiling,
        "results": results,
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "note": (
            "The servers run on this machine one after the other, with the load generator on the same "
            "cores; loadavg_1m_before/after show other activity on the machine around each run "
            "(the run itself keeps about 2-3 runnable; a loadavg_1m_before well above 1 means other processes "
            "were competing for the 2 cores and the figures are lower than on a quiet machine)."
        ),
    }
    if "bento" in results and "plain" in results:
        b, p = results["bento"], results["plain"]
        out["comparison"] = {
            "throughput_ratio_bento_over_plain": round(b["requests_per_s"] / p["requests_per_s"], 3)
            if p["requests_per_s"]
            else None,
            "targets": {
                "zero_errors": b["errors"] == 0,
                "p99_under_250ms": bool(b.get("latency_ms", {}).get("p99", 1e9) < 250),
                "throughput_at_least_plain": b["requests_per_s"] >= p["requests_per_s"],
            },
        }
    if "bento" in results and "bento-log-off" in results and results["bento-log-off"]["requests_per_s"]:
        on, off = results["bento"]["requests_per_s"], results["bento-log-off"]["requests_per_s"]
        out.setdefault("comparison", {})["throughput_log_on_over_log_off"] = round(on / off, 3)
    write_json(a.out, out)
    print(f"-> {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
