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
(default 25) after a warm-up, with authentication on (:func:`benchmarks.serve_load.load`); with
``--size 600x450`` the images are sent at the size of HAM10000's original release (the data here is
its 200x150 downscale, where the 200 px statistics copy is the image itself). ``--kinds`` picks the
kinds beside ``log-off``.

From one server to the next the same kind varies by more than the cost measured here (see the runs in
the JSON), so the JSON also gives each round's ratio to that round's ``log-off``, with their median and range,
and each server's CPU per answer over the measured window (the server's processes, the log's writer,
the whole machine) and the cores each used: the service uses about 1.4 of the 2 cores here, so its
throughput is bound by its interpreter lock and latency, not by CPU alone.

Run from the project root: ``python benchmarks/log_cost.py`` -> benchmarks/results/log_cost.json;
``python benchmarks/log_cost.py --size 600x450 --out benchmarks/results/log_cost_600x450.json``
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._machine import machine  # noqa: E402
from benchmarks.serve_load import free_port, load, load_arguments, packaged_service, real_blobs, start, stop  # noqa: E402
from pipeline.core.fsutil import write_json  # noqa: E402
from pipeline.registry import bento as bentos  # noqa: E402

OUT = ROOT / "benchmarks/results/log_cost.json"
KINDS = ("log-off", "log-on", "log-on-writer-stopped")
#: The parts of the machine whose CPU per answer the summary gives.
CPU_PARTS = ("server", "writer", "machine")


def is_writer(proc) -> bool:
    """Whether the psutil process ``proc`` is a log writer (psutil.Error when it ended)."""
    return "pipeline.serving.logworker" in " ".join(proc.cmdline())


def writers(pid: int) -> list:
    """The log's writer processes of the server started as ``pid`` (BentoML's worker starts them
    outside the server's process group)."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if is_writer(child):
                found.append(child)
    return found


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds used so far (user + system): by the server started as ``pid`` and its processes
    other than the log's writer (``server``), by its writers (``writer``), and by the whole machine
    (``machine``: every process and the kernel, the load's clients included; ``steal``: time the
    hypervisor gave to other machines)."""
    import psutil

    used = {"server": 0.0, "writer": 0.0}
    root = psutil.Process(pid)
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            part = "writer" if is_writer(proc) else "server"
            used[part] += t.user + t.system
    m = psutil.cpu_times()
    return {**used, "machine": m.user + m.nice + m.system + m.irq + m.softirq, "steal": m.steal}


def cpu_per_answer(before: dict[str, float], after: dict[str, float], answers: int, seconds: float) -> dict:
    """Milliseconds of CPU per answer over the measured window, and the cores each part used."""
    delta = {key: after[key] - before[key] for key in before}
    return {
        "cpu_ms_per_answer": {key: round(1000 * v / max(answers, 1), 3) for key, v in delta.items()},
        "cores_used": {key: round(v / seconds, 3) for key, v in delta.items()},
    }


def measured(pid: int, base: str, blobs: list[bytes], token: str, a) -> dict:
    """The load's stats, and the CPU each part used over its measured window (sampled when the
    warm-up ends and when the window ends)."""
    samples: list[dict[str, float]] = []

    def sample() -> None:
        time.sleep(a.warmup)
        samples.append(cpu_seconds(pid))
        time.sleep(a.duration)
        samples.append(cpu_seconds(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stats = asyncio.run(load(f"{base}/classify", blobs, a.clients, a.duration, a.warmup, token))
    sampler.join()
    return {**stats, **cpu_per_answer(samples[0], samples[1], stats["ok"], a.duration)}


def run(kind: str, env: dict, tmp: Path, blobs: list[bytes], token: str, a, k: int) -> dict:
    """One server of ``kind`` under the load; its requests/s, latencies and CPU per answer."""
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
        stats = measured(proc.pid, base, blobs, token, a)
    finally:
        for w in stopped:
            with contextlib.suppress(Exception):
                w.send_signal(signal.SIGCONT)
        stop(proc)
    stats.pop("error_examples", None)
    cpu = stats["cpu_ms_per_answer"]
    print(
        f"[{kind} #{k}] {stats['requests_per_s']} req/s; CPU ms per answer: server {cpu['server']}, "
        f"writer {cpu['writer']}, machine {cpu['machine']}; stolen {stats['cores_used']['steal']} cores",
        flush=True,
    )
    return {"kind": kind, "round": k, "writers_stopped": len(stopped), **stats}


def ran(runs: list[dict]) -> tuple[str, ...]:
    """The kinds among ``runs``, in the order of :data:`KINDS` (``log-off`` first)."""
    return tuple(kind for kind in KINDS if any(r["kind"] == kind for r in runs))


def rotated(kinds: tuple[str, ...], k: int) -> tuple[str, ...]:
    """The order of round ``k``: each kind starts a round in turn, so no kind always runs first."""
    k %= len(kinds)
    return kinds[k:] + kinds[:k]


def paired(runs: list[dict]) -> dict:
    """Each round's ratio of every kind to that round's ``log-off`` (the servers of one round ran
    back to back, so the machine's slower drift cancels), and their median and range over rounds."""
    rounds = sorted({r["round"] for r in runs})
    rps = {(r["kind"], r["round"]): r["requests_per_s"] for r in runs}
    ratios = {kind: [round(rps[kind, k] / rps["log-off", k], 3) for k in rounds] for kind in ran(runs)[1:]}
    return {
        "round_ratios_to_log_off": ratios,
        "median_round_ratio_to_log_off": {kind: round(statistics.median(v), 3) for kind, v in ratios.items()},
        "round_ratio_range": {kind: [min(v), max(v)] for kind, v in ratios.items()},
    }


def mean_of(runs: list[dict], kind: str, value, digits: int = 3) -> float:
    """The mean of ``value(run)`` over the runs of ``kind``."""
    return round(statistics.mean(value(r) for r in runs if r["kind"] == kind), digits)


def cpu_summary(runs: list[dict]) -> dict:
    """Each kind's mean CPU per answer (server, writer, machine) and the machine's ratio to
    ``log-off``. The server uses about the same cores whatever its throughput, so its CPU per
    answer moves with the throughput's noise too: it says where the time goes, not a second,
    quieter measure of the cost."""
    mean = {
        kind: {part: mean_of(runs, kind, lambda r, p=part: r["cpu_ms_per_answer"][p]) for part in CPU_PARTS}
        for kind in ran(runs)
    }
    off = mean["log-off"]["machine"]
    return {
        "mean_cpu_ms_per_answer": mean,
        "machine_cpu_per_answer_to_log_off": {kind: round(v["machine"] / off, 3) for kind, v in mean.items()},
        "mean_stolen_cores": {kind: mean_of(runs, kind, lambda r: r["cores_used"]["steal"]) for kind in ran(runs)},
    }


def resized(blob: bytes, size: str) -> bytes:
    """A JPEG (quality 90) of the image ``blob`` at ``size`` (``WxH``)."""
    import io

    from PIL import Image

    w, h = (int(v) for v in size.lower().split("x"))
    buf = io.BytesIO()
    Image.open(io.BytesIO(blob)).convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = load_arguments(__doc__.split("\n\n")[0])
    ap.set_defaults(duration=25.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--size",
        default=None,
        metavar="WxH",
        help="send the images resized to this size, as JPEG quality 90 (e.g. 600x450: HAM10000's original release)",
    )
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="log-off always runs")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    blobs = real_blobs(a.images_dir, a.images)
    if a.size:
        blobs = [resized(blob, a.size) for blob in blobs]
    tmp = Path(tempfile.mkdtemp(prefix="log_cost-"))
    os.environ["LESIONFLOW_LOG_SPOOL"] = str(tmp / "spool")  # the backlog of the stopped writer, here
    try:
        env, model_info, tag, _, token = packaged_service(tmp)
        env = {**env, "LESIONFLOW_WORKERS": "1"}
        kinds = tuple(kind for kind in KINDS if kind == "log-off" or kind in a.kinds)
        runs = [run(kind, env, tmp, blobs, token, a, k) for k in range(a.rounds) for kind in rotated(kinds, k)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mean = {kind: mean_of(runs, kind, lambda r: r["requests_per_s"], 2) for kind in ran(runs)}
    off = mean["log-off"]
    out = {
        "benchmark": "log_cost",
        "machine": machine(),
        "model": {**model_info, "tag": tag},
        "replica": "bentoml serve, 1 worker, authentication on",
        "load": {
            "clients": a.clients,
            "duration_s": a.duration,
            "warmup_s": a.warmup,
            "images": len(blobs),
            "image_size": a.size or "as stored (200x150)",
            "mean_upload_bytes": round(sum(map(len, blobs)) / len(blobs)),
        },
        "runs": runs,
        "mean_requests_per_s": mean,
        "log_off_spread": [
            min(r["requests_per_s"] for r in runs if r["kind"] == "log-off"),
            max(r["requests_per_s"] for r in runs if r["kind"] == "log-off"),
        ],
        "ratios_to_log_off": {kind: round(v / off, 3) for kind, v in mean.items()},
        **paired(runs),
        **cpu_summary(runs),
    }
    write_json(a.out, out)
    print(f"-> {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
