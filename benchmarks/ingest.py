"""Benchmark: ingesting a batch of labelled images into a DVC-versioned dataset.

Side by side in one run, in two throw-away git + DVC workspaces holding HAM10000 minus a held-back
set of whole lesions (``--images`` images, default 1,000):

* the baseline a user would otherwise write: copy the files into ``data/images/``, append the
  rows to the metadata table, ``dvc add data`` (no checks at all);
* ``lesionflow ingest``: the data contract on the batch, collisions with the current data,
  byte-identical and near-duplicate copies of existing images, then the same merge and
  ``dvc add data``, all or nothing.

Both end with the same ``data.dvc`` md5 (checked). Run from the project root:
``python benchmarks/ingest.py`` -> benchmarks/results/ingest.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from benchmarks._machine import machine  # noqa: E402


def _env(ws: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(ws / ".dvc-site-cache"),
        "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@lesionflow.invalid",
        "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@lesionflow.invalid",
    }  # fmt: skip


def workspace(dest: Path, meta: pd.DataFrame, images: Path) -> Path:
    """A git + DVC workspace with the project's code and ``meta``'s images as data version 1."""
    for name in ("pipeline", "flows"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(ROOT / name, dest / name)
    (dest / "data/images").mkdir(parents=True)
    meta.to_csv(dest / "data/HAM10000_metadata.csv", index=False)
    for i in meta["image_id"]:
        os.link(images / f"{i}.jpg", dest / "data/images" / f"{i}.jpg")
    (dest / ".gitignore").write_text("/.dvc-site-cache/\n/.lesionflow/\n__pycache__/\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "v1"]):  # fmt: skip
        subprocess.run(cmd, cwd=dest, env=_env(dest), check=True, capture_output=True)
    return dest


def baseline(ws: Path, batch: pd.DataFrame, batch_dir: Path) -> float:
    t0 = time.perf_counter()
    for i in batch["image_id"]:
        shutil.copyfile(batch_dir / f"{i}.jpg", ws / "data/images" / f"{i}.jpg")
    with open(ws / "data/HAM10000_metadata.csv", "a") as fh:
        batch.to_csv(fh, index=False, header=False, lineterminator="\n")
    subprocess.run(["dvc", "add", "-q", "data"], cwd=ws, env=_env(ws), check=True, capture_output=True)
    return time.perf_counter() - t0


def lesionflow(ws: Path, batch_dir: Path, csv: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "ingest", str(batch_dir), "--metadata", str(csv),
                           "--no-progress"], cwd=ws, env=_env(ws), capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--images", type=int, default=1000, help="images held back and ingested (whole lesions)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/ingest.json")
    args = ap.parse_args(argv)
    meta = pd.read_csv(args.data / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    lesions = meta["lesion_id"].drop_duplicates().sample(frac=1.0, random_state=args.seed)
    sizes = meta.groupby("lesion_id").size()
    held = set(lesions[sizes[lesions].cumsum().to_numpy() <= args.images])
    batch, v1 = meta[meta["lesion_id"].isin(held)], meta[~meta["lesion_id"].isin(held)]
    with tempfile.TemporaryDirectory(prefix="lesionflow-ingest-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "batch").mkdir()
        for i in batch["image_id"]:
            os.link(args.data / "images" / f"{i}.jpg", tmp / "batch" / f"{i}.jpg")
        batch.to_csv(tmp / "batch.csv", index=False)
        t_base = baseline(workspace(tmp / "base", v1, args.data / "images"), batch, tmp / "batch")
        t_ours = lesionflow(workspace(tmp / "ours", v1, args.data / "images"), tmp / "batch", tmp / "batch.csv")
        md5 = [yaml.safe_load((tmp / w / "data.dvc").read_text())["outs"][0]["md5"] for w in ("base", "ours")]
    report = {
        "benchmark": "ingest",
        "machine": machine(),
        "existing_images": len(v1),
        "batch_images": len(batch),
        "batch_lesions": len(held),
        "seconds": {"baseline_copy_append_dvc_add": round(t_base, 2), "lesionflow_ingest": round(t_ours, 2)},
        "same_data_version": md5[0] == md5[1],
        "data_md5": md5[1],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["seconds"]), "same data version:", report["same_data_version"], "->", args.out)
    return 0 if report["same_data_version"] else 1


if __name__ == "__main__":
    sys.exit(main())
