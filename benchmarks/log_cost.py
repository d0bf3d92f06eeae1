"""Benchmark: where the inference log's throughput cost comes from.

Side by side in one run, one server at a time (the same packaged model, images and load), each of
these kinds once per round, ``--rounds`` rounds (default 5), the order rotated from round to round:

* ``log-off``: the service with its inference log off (``LESIONFLOW_INFERENCE_LOG=off``);
* ``log-on``: the log on a local folder, as shipped (its writer waits while the service is busy:
  :class:`pipeline.serving.logworker.Pacing`);
* ``log-on-writer-stopped``: the log on, with the log's writer process stopped (SIGSTOP) for the
  whole load: every answer record is still written and the statistics copies still wait (memory,
  then disk), but no statistics are computed. Its throughput against ``log-off`` is the cost of
  the request path alone; ``log-on`` against it is the cost of the writer's work on the same cores.

Load: ``--clients`` concurrent clients (default 32) posting real JPEGs for ``--duration`` seconds
(default 25) after a warm-up, with authentication on (:func:`benchmarks.serve_load.load`).

From one server to the next the same kind varies by more than the cost measured here (see the runs in
the JSON), so the JSON also gives each round's ratio to that round's ``log-off``, with their median and range.

Run from the project root: ``python benchmarks/log_cost.py`` -> benchmarks/results/log_cost.json
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._machine import machine  # noqa: E402
from benchmarks.serve_load import free_port, load, load_arguments, packaged_service, real_blobs, start, stop  # noqa: E402
from pipeline.core.fsutil import write_json  # noqa: E402
from pipeline.registry import bento as bentos  # noqa: E402

OUT = ROOT / "benchmarks/results/log_cost.json"
KINDS = ("log-off", "log-on", "log-on-writer-stopped")


def writers(pid: int) -> list:
    """The log's writer processes of the server started as ``pid`` (BentoML's worker starts them
    outside the server's process group)."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "pipeline.serving.logworker" in " ".join(child.cmdline()):
                found.append(child)
    return found


def run(kind: str, env: dict, tmp: Path, blobs: list[bytes], token: str, a, k: int) -> dict:
    """One server of ``kind`` under the load; its requests/s and latencies."""
    log = "off" if kind == "log-off" else str(tmp / f"{kind}-{k}")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(
        bentos.serve_command(port=port),
        {**env, "LESIONFLOW_INFERENCE_LOG": log},
        f"{base}/readyz",
        tmp / f"{kind}-{k}.log",
    )
    stopped = []
    try:
        if kind == "log-on-writer-stopped":
            stopped = writers(proc.pid)
            for w in stopped:
                w.send_signal(signal.SIGSTOP)
        stats = asyncio.run(load(f"{base}/classify", blobs, a.clients, a.duration, a.warmup, token))
    finally:
        for w in stopped:
            with contextlib.suppress(Exception):
                w.send_signal(signal.SIGCONT)
        stop(proc)
    stats.pop("error_examples", None)
    print(f"[{kind} #{k}] {stats['requests_per_s']} req/s", flush=True)
    return {"kind": kind, "round": k, "writers_stopped": len(stopped), **stats}


def rotated(kinds: tuple[str, ...], k: int) -> tuple[str, ...]:
    """The order of round ``k``: each kind starts a round in turn, so no kind always runs first."""
    k %= len(kinds)
    return kinds[k:] + kinds[:k]


def paired(runs: list[dict]) -> dict:
    """Each round's ratio of every kind to that round's ``log-off`` (the servers of one round ran
    back to back, so the machine's slower drift cancels), and their median and range over rounds."""
    rounds = sorted({r["round"] for r in runs})
    rps = {(r["kind"], r["round"]): r["requests_per_s"] for r in runs}
    ratios = {kind: [round(rps[kind, k] / rps["log-off", k], 3) for k in rounds] for kind in KINDS[1:]}
    return {
        "round_ratios_to_log_off": ratios,
        "median_round_ratio_to_log_off": {kind: round(statistics.median(v), 3) for kind, v in ratios.items()},
        "round_ratio_range": {kind: [min(v), max(v)] for kind, v in ratios.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = load_arguments(__doc__.split("\n\n")[0])
    ap.set_defaults(duration=25.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    blobs = real_blobs(a.images_dir, a.images)
    tmp = Path(tempfile.mkdtemp(prefix="log_cost-"))
    os.environ["LESIONFLOW_LOG_SPOOL"] = str(tmp / "spool")  # the backlog of the stopped writer, here
    try:
        env, model_info, tag, _, token = packaged_service(tmp)
        env = {**env, "LESIONFLOW_WORKERS": "1"}
        runs = [run(kind, env, tmp, blobs, token, a, k) for k in range(a.rounds) for kind in rotated(KINDS, k)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mean = {kind: round(statistics.mean(r["requests_per_s"] for r in runs if r["kind"] == kind), 2) for kind in KINDS}
    off = mean["log-off"]
    out = {
        "benchmark": "log_cost",
        "machine": machine(),
        "model": {**model_info, "tag": tag},
        "replica": "bentoml serve, 1 worker, authentication on",
        "load": {"clients": a.clients, "duration_s": a.duration, "warmup_s": a.warmup, "images": len(blobs)},
        "runs": runs,
        "mean_requests_per_s": mean,
        "log_off_spread": [
            min(r["requests_per_s"] for r in runs if r["kind"] == "log-off"),
            max(r["requests_per_s"] for r in runs if r["kind"] == "log-off"),
        ],
        "ratios_to_log_off": {kind: round(v / off, 3) for kind, v in mean.items()},
        **paired(runs),
    }
    write_json(a.out, out)
    print(f"-> {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
