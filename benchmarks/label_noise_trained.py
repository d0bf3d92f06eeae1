"""Benchmark: does the label review find label errors the model was trained on?

``benchmarks/label_noise.py`` flips labels of a copy of the data and reviews them with the
champion, which learnt the clean labels (an upper bound), or with ImageNet embeddings that never
saw a label (a lower bound). This one is the real case: the same class-conditional 5 % flips are
made in the split files, a model is trained on them with the default recipe (the train stage,
unchanged), and the review runs on that model's embeddings, as the ``review`` stage would; beside
it, ranking by that model's own loss (what a user without confident learning would write), now a
fair baseline. One training run per draw (about 15 minutes on 2 cores).

Run from the project root after ``make run``:
`python benchmarks/label_noise_trained.py [--seeds 1]` -> benchmarks/results/label_noise_trained.json

``c`` is chosen on one half of the lesions and the figures are the other half's
(:func:`benchmarks.label_noise.halves`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from benchmarks.label_noise import (  # noqa: E402
    C_GRID,
    chosen_and_reported,
    dataset,
    embed_with_probs,
    halves,
    image_paths,
    rankings,
)
from pipeline.core import lineage  # noqa: E402
from pipeline.core.fsutil import write_json  # noqa: E402
from pipeline.core.layout import SPLITS  # noqa: E402
from pipeline.evaluation import labelreview as lr  # noqa: E402

OUT = ROOT / "benchmarks/results/label_noise_trained.json"
WORK = ROOT / "artifacts/benchmarks/label_noise_trained"


def noisy_splits(frame, noisy: np.ndarray, classes: list[str], dest: Path) -> None:
    """The split files with the flipped diagnoses (``frame``: the three splits in order)."""
    out = frame.assign(dx=[classes[i] for i in noisy])
    dest.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        out[out["split"] == name].to_csv(dest / f"{name}.csv", index=False)


def train(split_dir: Path, model_dir: Path) -> float:
    """The train stage on ``split_dir`` (seconds)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pipeline.stages.train", "--splits", str(split_dir), "--out", str(model_dir),
           "--reports", str(model_dir.parent / "reports"), "--no-progress"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def one_seed(seed: int, classes, frame, labels, champion_probs, half) -> dict:
    """Flip, train on the flips, review and rank by loss; the share of flips in each half's first 10 %."""
    confusion = confusion_matrix(labels, champion_probs.argmax(1), labels=list(range(len(classes))))
    noisy, flipped = lr.flip_labels(labels, 0.05, len(classes), confusion, seed=seed)
    work = WORK / f"seed{seed}"
    noisy_splits(frame, noisy, classes, work / "splits")
    seconds = train(work / "splits", work / "model")
    emb, probs = embed_with_probs(work / "model", frame, image_paths(frame), "embeddings (noisy model)")
    found = rankings(emb, probs, noisy, flipped, frame["lesion_id"].tolist(), half, len(classes), seed, C_GRID)
    return {"seed": seed, "flipped": int(flipped.sum()), "train_seconds": round(seconds, 1), **found}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=1, help="flip draws (one training run each)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    classes, frame, _, champion_probs, labels = dataset()
    half = halves(frame["lesion_id"])
    runs = [one_seed(s, classes, frame, labels, champion_probs, half) for s in range(args.seeds)]
    result = {
        "benchmark": "label_noise_trained",
        "machine": machine(),
        "model_md5": lineage.file_md5(ROOT / "artifacts/model/model.pt"),
        "noisy_model_md5": [lineage.file_md5(WORK / f"seed{r['seed']}/model/model.pt") for r in runs],
        "images": len(frame),
        "share_flipped": 0.05,
        "top_share": 0.10,
        **chosen_and_reported(runs),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out, result)
    print(json.dumps(result["report_half"], indent=2), f"c={result['chosen_c']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
