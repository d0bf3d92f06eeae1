"""Benchmark: the inference log under load: every answer accounted for, and what it costs.

Side by side in one run (one server at a time, the same packaged model, images and load):

* ``log-off``: the service with its inference log turned off (``LESIONFLOW_INFERENCE_LOG=off``),
  the throughput a user gets without any record;
* ``log-on``: the log on a local folder, as shipped. After the load the benchmark waits until the
  log's writer (which only gets CPU the service leaves idle) caught up with the statistics, as
  the service's counters say (``statistics_caught_up_after_s``), then stops the server; the request
  ids of every 200 answer the clients received are looked up in the log: answers without a
  record, the share with image statistics, the service's own counters at the end of the load and
  after the catch-up, and the throughput against ``log-off``;
* ``sigkill``: the log on; the service's process group and every process it started (BentoML's
  worker and the log's writer run in groups of their own) are SIGKILLed (an OOM kill, a lost
  node) ``--kill-after`` seconds into the load; answers received vs records;
* ``store-down``: the log on an S3-compatible object store (moto's server on 127.0.0.1), which is
  stopped (SIGSTOP: unreachable, every request to it hangs) ``--outage-start`` seconds into the
  load for ``--outage`` seconds, then resumed; after the load the benchmark waits for the writer to
  catch up, as in ``log-on``; answers received vs records read back from the store after the
  server stopped.

Load: ``--clients`` concurrent clients (default 32) posting real JPEGs back to back for
``--duration`` seconds (default 60) after a warm-up, with authentication on
(:func:`benchmarks.serve_load.load`).

Run from the project root: ``python benchmarks/log_under_load.py`` -> benchmarks/results/log_under_load.json
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._machine import machine  # noqa: E402
from benchmarks.serve_load import (  # noqa: E402
    bento_info,
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
from tests.s3_fixtures import BUCKET, PIDS, s3_server  # noqa: E402

OUT = ROOT / "benchmarks/results/log_under_load.json"


def accounted(answered: list[str], location: str) -> dict:
    """The log's records of the answers the clients received."""
    from pipeline.monitoring import inferencelog

    df = inferencelog.read(location)
    ids = set(df["request_id"]) if len(df) else set()
    got = set(answered)
    with_stats = int(df[df["request_id"].isin(got)]["has_statistics"].sum()) if len(df) else 0
    return {
        "answers_received": len(got),
        "records": int(len(df)),
        "answers_without_record": len(got - ids),
        "answers_with_statistics": with_stats,
        "statistics_coverage": round(with_stats / len(got), 4) if got else None,
        "reader_coverage": df.attrs.get("coverage"),
    }


def submit_cost(blobs: list[bytes], tmp: Path, stored: Path, n: int = 2000) -> dict:
    """What logging costs the request path: :meth:`BackgroundLog.submit` (the answer record written,
    the statistics copy queued) in this process, per call, on the images as the service decodes
    them, with the packaged model's reference profile (projection and statistics side)."""
    import numpy as np

    from pipeline.core.images import decode_rgb
    from pipeline.monitoring.logrecord import Answer, uploaded_file_identity
    from pipeline.serving.logqueue import BackgroundLog

    decoded = [decode_rgb(b, f"image{k}") for k, b in enumerate(blobs)]
    log = BackgroundLog(stored, str(tmp / "submit-cost"), max_queue_bytes=1 << 40, writer="bench-w0")
    rng = np.random.default_rng(0)
    dim = 0 if log.projection is None else log.projection.shape[0]
    seconds = []
    for k in range(n):
        p = rng.dirichlet(np.ones(7))
        prediction = {"dx_probabilities": dict(zip("abcdefg", p.tolist())), "p_malignant": 0.3, "decision": "x"}
        sha, size = uploaded_file_identity(blobs[k % len(blobs)])
        embedding = rng.standard_normal(dim) if dim else None
        answer = Answer(decoded[k % len(decoded)], prediction, "bench", {"age": 50}, embedding,
                        image_sha256=sha, image_nbytes=size, route="/classify")  # fmt: skip
        t0 = time.perf_counter()
        log.submit(answer)
        seconds.append(time.perf_counter() - t0)
    log.close(timeout=600)
    us = np.array(seconds) * 1e6
    return {
        "calls": n,
        "image_sides": sorted({int(max(d.shape[:2])) for d in decoded}),
        "per_call_us": {
            "mean": round(float(us.mean()), 1),
            "p50": round(float(np.percentile(us, 50)), 1),
            "p99": round(float(np.percentile(us, 99)), 1),
        },  # fmt: skip
        "note": "sha256 of the upload is computed before submit (in the service, in finalise): not included",
    }


def caught_up(base: str, token: str, limit_s: float) -> float | None:
    """Seconds after the load until no answer's statistics wait for the log's writer (None: not
    within ``limit_s``), read from the service's own counters as an operator would."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if (bento_info(base, token).get("inference_log") or {}).get("queued") == 0:
            return round(time.monotonic() - t0, 1)
        time.sleep(0.5)
    return None


def scenario(
    name: str, env: dict, tmp: Path, blobs: list[bytes], token: str, a, during=None, catch_up: bool = False
) -> dict:
    """Start the service with ``env``, load it (``during(base, proc)`` runs beside the load), with
    ``catch_up`` wait for the log's writer to catch up (statistics computed after the peak), stop it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(bentos.serve_command(port=port), env, f"{base}/readyz", tmp / f"{name}.log")
    answered: list[str] = []
    side = None
    try:
        if during is not None:
            side = threading.Thread(target=during, args=(proc,), daemon=True)
            side.start()
        duration = a.kill_after + 2 if name == "sigkill" else a.duration
        stats = asyncio.run(load(f"{base}/classify", blobs, a.clients, duration, a.warmup, token, answered))
        info = bento_info(base, token) if proc.poll() is None else {}
        if catch_up and proc.poll() is None:
            info["statistics_caught_up_after_s"] = caught_up(base, token, a.catch_up_limit)
            info["after_catch_up"] = bento_info(base, token).get("inference_log")
    finally:
        if side is not None:
            side.join()
        stop(proc)  # SIGTERM: the service drains its log (a no-op after a SIGKILL)
    stats.pop("error_examples", None)
    print(f"[{name}] {stats['requests_per_s']} req/s, {len(answered)} answers", flush=True)
    log = info.get("inference_log")
    if catch_up and log is not None:
        log = {"at_end_of_load": log, **{k: info.get(k) for k in ("statistics_caught_up_after_s", "after_catch_up")}}
    return {"load": stats, "inference_log": log, "answered": answered}


def main(argv: list[str] | None = None) -> int:
    ap = load_arguments(__doc__.split("\n\n")[0])
    ap.set_defaults(duration=60.0)
    ap.add_argument("--kill-after", type=float, default=20.0, help="seconds of load before the SIGKILL")
    ap.add_argument("--outage-start", type=float, default=15.0, help="seconds of load before the store stops")
    ap.add_argument("--outage", type=float, default=30.0, help="seconds the object store is down")
    ap.add_argument("--catch-up-limit", type=float, default=300.0, help="seconds to wait for the log's statistics")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)

    blobs = real_blobs(a.images_dir, a.images)
    tmp = Path(tempfile.mkdtemp(prefix="log_under_load-"))
    results: dict[str, dict] = {}
    try:
        env, model_info, tag, stored, token = packaged_service(tmp)
        env = {**env, "LESIONFLOW_WORKERS": "1"}
        results["submit_cost"] = submit_cost(blobs, tmp, stored)
        print(f"[submit] {results['submit_cost']['per_call_us']} us per call", flush=True)
        off = scenario("log-off", {**env, "LESIONFLOW_INFERENCE_LOG": "off"}, tmp, blobs, token, a)
        results["log-off"] = {"load": off["load"]}

        local = str(tmp / "log-on")
        on = scenario("log-on", {**env, "LESIONFLOW_INFERENCE_LOG": local}, tmp, blobs, token, a, catch_up=True)
        results["log-on"] = {"load": on["load"], "counters": on["inference_log"], **accounted(on["answered"], local)}
        results["log-on"]["throughput_vs_log_off"] = round(
            on["load"]["requests_per_s"] / max(off["load"]["requests_per_s"], 1e-9), 4
        )

        killed_log = str(tmp / "sigkill")

        def kill(proc: subprocess.Popen) -> None:
            import psutil

            time.sleep(a.warmup + a.kill_after)
            # BentoML starts its worker (and that its log writer) outside the server's group: a lost
            # node loses all of them
            lost = psutil.Process(proc.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for child in lost:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()

        killed = scenario("sigkill", {**env, "LESIONFLOW_INFERENCE_LOG": killed_log}, tmp, blobs, token, a, kill)
        results["sigkill"] = {"load": killed["load"], **accounted(killed["answered"], killed_log)}

        url = f"s3://{BUCKET}/inference"
        outage: dict[str, float] = {}
        with s3_server(tmp / "moto.log") as s3_env:  # the S3-compatible server of the test suite
            os.environ.update(s3_env)  # the reader, in this process
            store = PIDS[s3_env["AWS_ENDPOINT_URL"]]

            def store_goes_down(proc: subprocess.Popen) -> None:
                time.sleep(a.warmup + a.outage_start)
                os.killpg(store, signal.SIGSTOP)  # unreachable: every request to it hangs
                outage["down_at_s"] = round(a.warmup + a.outage_start, 1)
                time.sleep(a.outage)
                os.killpg(store, signal.SIGCONT)
                outage["back_at_s"] = round(a.warmup + a.outage_start + a.outage, 1)

            s3_run_env = {**env, **s3_env, "LESIONFLOW_INFERENCE_LOG": url, "LESIONFLOW_LOG_SPOOL": str(tmp / "spool")}
            down = scenario("store-down", s3_run_env, tmp, blobs, token, a, store_goes_down, catch_up=True)
            results["store-down"] = {
                "load": down["load"],
                "counters": down["inference_log"],
                "outage": {**outage, "seconds": a.outage, "how": "the store's process stopped (SIGSTOP), then resumed"},
                "spool_left": len(list((tmp / "spool").rglob("*.jsonl*"))),
                **accounted(down["answered"], url),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "benchmark": "log_under_load",
        "machine": machine(),
        "model": {**model_info, "tag": tag},
        "replica": "bentoml serve, 1 worker, authentication on",
        "load": {"clients": a.clients, "duration_s": a.duration, "warmup_s": a.warmup, "images": len(blobs)},
        "results": results,
        "targets": {
            "log_on_no_answer_without_record": results["log-on"]["answers_without_record"] == 0,
            "log_on_statistics_coverage_at_least_99pct": (results["log-on"]["statistics_coverage"] or 0) >= 0.99,
            "log_on_throughput_at_least_95pct_of_log_off": results["log-on"]["throughput_vs_log_off"] >= 0.95,
            "sigkill_no_answer_without_record": results["sigkill"]["answers_without_record"] == 0,
            "store_down_no_answer_without_record": results["store-down"]["answers_without_record"] == 0,
        },
    }
    write_json(a.out, out)
    print(f"-> {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
