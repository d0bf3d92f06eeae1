"""Benchmark: does the label review find label errors? Flip 5 % of HAM10000's diagnoses
class-conditionally (each class towards the class the model confuses it with most, as real label
noise is) and see how many flips the review ranks in its first 10 %, against ranking by the
model's own loss (what a user without confident learning would write).

Run from the project root after ``make run``:
`python benchmarks/label_noise.py [--share 0.05] [--seeds 3]` -> benchmarks/results/label_noise.json

The review's logistic regression strength ``c`` is chosen on one half of the lesions (by md5 of
the lesion id) and reported on the other. Both rankings use the champion's embeddings and
predictions; the champion learnt the *clean* labels of the training split, which helps both
(it disagrees with a flipped training label), so the figures are an upper bound for errors that
were in the data the model was trained on.

``--embeddings imagenet`` (-> label_noise_imagenet.json) gives the review the embeddings of the
ImageNet EfficientNet-Lite0 backbone instead, which never saw a HAM10000 label: the figure for
errors the model learnt along. Beside it, ranking by the loss of the same out-of-fold
probabilities (``out_of_fold_loss``) separates what confident learning adds from what the
out-of-fold regression gives; the champion's loss (``model_loss``) stays the upper-bound baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import confusion_matrix  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from pipeline.core import lineage, params  # noqa: E402
from pipeline.core.fsutil import write_json  # noqa: E402
from pipeline.data import splits  # noqa: E402
from pipeline.evaluation import labelreview as lr  # noqa: E402
from pipeline.model import retrieval  # noqa: E402
from pipeline.model.inference import load_model  # noqa: E402

OUT = ROOT / "benchmarks/results/label_noise.json"
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


def features(model_dir: Path, cache: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Every labelled image (three splits), its embedding and the model's diagnosis probabilities,
    cached by model md5."""
    frames = splits.read_splits(ROOT / "artifacts/splits")
    frame = pd.concat([f.assign(split=n) for n, f in frames.items()], ignore_index=True)
    md5 = lineage.file_md5(model_dir / "model.pt")
    path = cache / f"features-{md5[:12]}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return frame, z["embeddings"], z["probs"]
    emb, probs = embed_with_probs(model_dir, frame, image_paths(frame), "embeddings")
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, embeddings=emb, probs=probs)
    return frame, emb, probs


def embed_with_probs(model_dir: Path, frame: pd.DataFrame, files: list[Path], desc: str) -> tuple[np.ndarray, ...]:
    """The embeddings (:func:`pipeline.model.retrieval.embed`) and diagnosis probabilities of every
    row of ``frame`` by the model in ``model_dir``, in one pass."""
    probs: list[np.ndarray] = []
    emb = retrieval.embed(load_model(model_dir), frame, files, 64, True, desc,
                          lambda _rgbs, out: probs.append(out["dx_probs"]))  # fmt: skip
    return emb, np.concatenate(probs)


def dataset() -> tuple[list[str], pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """The diagnoses, every labelled image (:func:`features` of the champion in artifacts/model),
    its embedding, the model's probabilities and the diagnosis as a class index."""
    classes = list(params.load_taxonomy(ROOT / "params.yaml").diagnoses)
    frame, emb, probs = features(ROOT / "artifacts/model", ROOT / "artifacts/benchmarks/label_noise")
    return classes, frame, emb, probs, frame["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy()


def imagenet_features(files: list[Path], cache: Path, batch: int = 64) -> np.ndarray:
    """L2-normalised ImageNet EfficientNet-Lite0 embeddings (average-pooled last feature map at
    its 224x224 input) of ``files``, which never saw a HAM10000 label; cached."""
    path = cache / f"imagenet-lite0-{len(files)}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    import torch
    from tqdm.auto import tqdm

    from pipeline.core import images
    from pipeline.model import backbones

    spec = backbones.backbone_spec("efficientnet_lite0")
    body = spec.build(True, spec.input_size).body.eval()
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(files), batch), desc="ImageNet embeddings", unit="batch"):
            u8 = np.stack([images.resize_rgb(images.decode_rgb(f), *spec.input_size) for f in files[s : s + batch]])
            x = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            out.append(body(x).mean(dim=(2, 3)).numpy())
    emb = retrieval.normalise(np.concatenate(out))
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb


def image_paths(frame: pd.DataFrame) -> list[Path]:
    """The image file of every row of :func:`features`' frame (the three splits, in order)."""
    return splits.image_files(frame, ROOT / "data/images", ROOT / "artifacts/splits")


def halves(lesions: pd.Series) -> np.ndarray:
    """``choose`` or ``report`` per row, by its lesion (a lesion's images in one half)."""
    return np.array(["choose" if int(hashlib.md5(str(i).encode()).hexdigest(), 16) % 2 else "report" for i in lesions])


def one_seed(emb, model_probs, labels, groups, half, n_classes, share, seed, c_values) -> dict:
    """Flip, rank by the review (each ``c``) and by the model's loss; the share of flips in the
    first 10 % of each half's ranking."""
    confusion = confusion_matrix(labels, model_probs.argmax(axis=1), labels=list(range(n_classes)))
    noisy, flipped = lr.flip_labels(labels, share, n_classes, confusion, seed=seed)
    return {"flipped": int(flipped.sum()), **rankings(emb, model_probs, noisy, flipped, groups, half, n_classes,
                                                      seed, c_values)}  # fmt: skip


def rankings(emb, model_probs, noisy, flipped, groups, half, n_classes, seed, c_values) -> dict:
    """The share of ``flipped`` in the first 10 % of each half's ranking: by the model's loss
    (``model_probs``), and for each ``c`` by the review and by the loss of the same out-of-fold
    probabilities."""
    out: dict = {"review": {}, "model_loss": {}, "out_of_fold_loss": {}}
    for h in ("choose", "report"):
        m = half == h
        out["model_loss"][h] = lr.share_found_in_top(lr.rank_by_loss(noisy[m], model_probs[m]), flipped[m], 0.10)
    for c in c_values:
        probs = lr.out_of_fold_probs(emb, noisy, groups, n_classes, folds=5, seed=seed, c=c, components=128)
        out["review"][str(c)], out["out_of_fold_loss"][str(c)] = {}, {}
        for h in ("choose", "report"):
            m = half == h
            ranked = lr.rank_label_issues(noisy[m], probs[m])
            out["review"][str(c)][h] = lr.share_found_in_top(ranked.index.to_numpy(), flipped[m], 0.10)
            by_loss = lr.rank_by_loss(noisy[m], probs[m])
            out["out_of_fold_loss"][str(c)][h] = lr.share_found_in_top(by_loss, flipped[m], 0.10)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--share", type=float, default=0.05, help="share of each class's labels flipped")
    ap.add_argument("--seeds", type=int, default=3, help="flips drawn")
    ap.add_argument("--out", type=Path, default=None, help="default: results/label_noise[_imagenet].json")
    ap.add_argument("--embeddings", choices=("champion", "imagenet"), default="champion",
                    help="the review's features: the champion's (it learnt the clean training labels: an upper "
                    "bound) or ImageNet EfficientNet-Lite0's (never saw a label)")  # fmt: skip
    args = ap.parse_args(argv)
    args.out = args.out or (OUT if args.embeddings == "champion" else OUT.with_name("label_noise_imagenet.json"))
    t0 = time.perf_counter()
    classes, frame, emb, model_probs, labels = dataset()
    if args.embeddings == "imagenet":
        emb = imagenet_features(image_paths(frame), ROOT / "artifacts/benchmarks/label_noise")
    half = halves(frame["lesion_id"])
    from tqdm.auto import tqdm

    runs = [one_seed(emb, model_probs, labels, frame["lesion_id"].tolist(), half, len(classes), args.share, s, C_GRID)
            for s in tqdm(range(args.seeds), desc="flips (each: every c, 5 folds)", unit="seed")]  # fmt: skip
    result = {
        "benchmark": "label_noise",
        "machine": machine(),
        "model_md5": lineage.file_md5(ROOT / "artifacts/model/model.pt"),
        "images": len(frame),
        "embeddings": args.embeddings,
        "share_flipped": args.share,
        "top_share": 0.10,
        **chosen_and_reported(runs),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out, result)
    print(json.dumps(result["report_half"], indent=2), f"c={result['chosen_c']} -> {args.out}")
    return 0


def chosen_and_reported(runs: list[dict]) -> dict:
    """``c`` chosen by the review's mean share on the choose half, and each ranking's share on the
    report half at that ``c`` (mean, min, max over the draws), with the draws themselves."""
    mean = {str(c): float(np.mean([r["review"][str(c)]["choose"] for r in runs])) for c in C_GRID}
    chosen = max(mean, key=mean.get)
    report = {
        "review": [r["review"][chosen]["report"] for r in runs],
        "out_of_fold_loss": [r["out_of_fold_loss"][chosen]["report"] for r in runs],
        "model_loss": [r["model_loss"]["report"] for r in runs],
    }
    return {
        "c_grid": list(C_GRID),
        "choose_half_mean_found": mean,
        "chosen_c": float(chosen),
        "report_half": {
            k: {"mean": round(float(np.mean(v)), 4), "min": round(min(v), 4), "max": round(max(v), 4), "runs": v}
            for k, v in report.items()
        },
        "target": "at least 60 % of the flips in the first 10 % of the ranking",
        "runs": runs,
    }


if __name__ == "__main__":
    sys.exit(main())
