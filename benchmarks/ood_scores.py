"""Benchmark: which out-of-distribution score should the model ship with, measured out of sample?

The non-dermoscopic images of :mod:`pipeline.evaluation.oodsets` come in kinds (photographs,
close-ups of objects, skin without a dermoscope, blank and near-blank frames, gradients, noise,
patterns, text and screenshots) and in two halves by source. In-distribution: the HAM10000 test
split, and a shifted copy of it (zoomed 1.33x at the centre, re-compressed as JPEG 60: other
clinics' dermoscopy is legitimate input), each cut into two halves by lesion. Candidates, each
thresholded as the shipped detector is (the score passing ``train.trust.ood_pass_share`` of the
validation split), and each together with the model's image-quality checks (a refused image is
one either of them stops):

* ``max_softmax``: the baseline a user would otherwise write (Hendrycks & Gimpel 2017);
* ``energy``: on the calibrated logits (Liu et al. 2020);
* ``mahalanobis``: the penultimate embedding to class-conditional Gaussians with a shared,
  Ledoit-Wolf shrunk covariance (Lee et al. 2018);
* ``mahalanobis_layers``: one Gaussian each on the pooled outputs of four blocks of the backbone
  and on the embedding, each distance standardised on val, summed; its covariance shrunk by
  Ledoit-Wolf's estimate, or by a fixed share (``mahalanobis_layers_s0.1``: 0.1, and 0.3, 0.5).

  Both are fitted by :func:`pipeline.model.ood.fit` on the whole training split, as the train
  stage fits the score it ships (``train.trust.ood_method``);
* ``image_statistics``: Mahalanobis on the image-quality features and the channel means and spreads;
* ``mahalanobis_or_statistics``: either of ``mahalanobis`` and ``image_statistics``, each at half
  the flagged share.

Each also at the stricter val pass share 0.995 (``method@0.995``).

The method is **chosen** on the ``choose`` halves (the most non-dermoscopic images refused, pooled
and averaged over the models, among those flagging at most 2 % of the test half and 5 % of the
shifted half for every model) and **reported** on the ``report`` halves, per kind, for the
champion (``artifacts/model``) and for ``--seeds`` models of a small recipe (the train stage with
``--epochs`` epochs and seeds 1..N), so that the figures show how much they move between trainings.

Run from the project root: ``python benchmarks/ood_scores.py [--seeds 3] [--epochs 2]``
-> benchmarks/results/ood_scores.json and ood_scores.png
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.covariance import LedoitWolf  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from pipeline.core import images, lineage, params  # noqa: E402
from pipeline.core.fsutil import write_json  # noqa: E402
from pipeline.data import splits  # noqa: E402
from pipeline.evaluation import oodsets  # noqa: E402
from pipeline.model import calibration, ood, quality  # noqa: E402
from pipeline.model.inference import load_model  # noqa: E402

OUT = ROOT / "benchmarks/results/ood_scores.json"
METHODS = (
    "max_softmax",
    "energy",
    "mahalanobis",
    "mahalanobis_layers",
    "image_statistics",
    "mahalanobis_or_statistics",
)
#: Each method is also tried at this stricter val pass share (``method@0.995``): a candidate
#: flagging more than 2 % of the test half at the shipped share may meet it here.
STRICT = 0.995
#: The multi-layer score's covariance shrinkage (None: Ledoit-Wolf's estimate, what
#: ``train.trust.ood_shrinkage: null`` ships), each a candidate ``mahalanobis_layers_s<value>``.
SHRINKAGES = (0.1, 0.3, 0.5)
METHODS += tuple(f"mahalanobis_layers_s{v}" for v in SHRINKAGES)
CANDIDATES = METHODS + tuple(f"{m}@{STRICT}" for m in METHODS)
TARGETS = {"refused_share": 0.95, "test_flagged_share": 0.02, "shifted_flagged_share": 0.05}


def shifted(rgb: np.ndarray) -> np.ndarray:
    """The shifted copy: the centre 1/1.33 zoomed back to full size, re-compressed as JPEG 60."""
    h, w = rgb.shape[:2]
    ch, cw = int(h / 1.33), int(w / 1.33)
    crop = Image.fromarray(rgb[(h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw])
    buf = io.BytesIO()
    crop.resize((w, h), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=60)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def lesion_half(lesion_ids: pd.Series) -> np.ndarray:
    """``choose`` or ``report`` per image, by its lesion id's md5 (a lesion's images stay together)."""
    return np.array(
        ["choose" if int(hashlib.md5(str(i).encode()).hexdigest(), 16) % 2 else "report" for i in lesion_ids]
    )


def image_statistics(u8: np.ndarray) -> np.ndarray:
    """(n, 11): the five image-quality features and the mean and spread of each channel."""
    q = quality.quality_features(u8)
    x = u8.astype(np.float32)
    return np.column_stack([*(q[f] for f in quality.FEATURES), x.mean(axis=(2, 3)), x.std(axis=(2, 3))])


def features(predictor, rgbs: list[np.ndarray], batch: int = 64) -> dict[str, np.ndarray]:
    """Per image: logits, embedding, the backbone's pooled block outputs (what the multi-layer score
    reads), image statistics and whether the model's image-quality checks refuse it."""
    predictor.blocks_wanted = True
    parts: dict[str, list[np.ndarray]] = {"logits": [], "embeddings": [], "blocks": [], "stats": [], "refused": []}
    try:
        for s in range(0, len(rgbs), batch):
            u8 = predictor.resize_u8(rgbs[s : s + batch])
            out = predictor.predict(u8, tta=False)
            parts["logits"].append(out["logits"][0])
            parts["embeddings"].append(out["embeddings"])
            parts["blocks"].append(out["blocks"])
            parts["stats"].append(image_statistics(u8))
            parts["refused"].append(np.array([bool(r) for r in out["quality_reasons"]]))
    finally:
        predictor.blocks_wanted = False
    return {k: np.concatenate(v) for k, v in parts.items()}


class Gaussian:
    """A class-agnostic Gaussian (Ledoit-Wolf shrunk) and the Mahalanobis distance to it."""

    def __init__(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float64)
        self.mean = x.mean(0)
        self.scale = x.std(0) + 1e-9
        self.precision = LedoitWolf().fit((x - self.mean) / self.scale).precision_

    def distance(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return np.sqrt(np.einsum("ij,jk,ik->i", z, self.precision, z))


def fit_scores(train: dict[str, np.ndarray], val: dict[str, np.ndarray], t: float):
    """The candidates' score functions (higher: more unusual). The two Mahalanobis scores are fitted
    exactly as the train stage fits them (:func:`pipeline.model.ood.fit` on the whole training
    split, the multi-layer one standardised on val); the rest as described in the docstring."""
    fitted = {m: ood.fit(m, train, val, 0.99, t)[0] for m in ("mahalanobis", "mahalanobis_layers")}
    fitted |= {f"mahalanobis_layers_s{v}": ood.fit("mahalanobis_layers", train, val, 0.99, t, v)[0] for v in SHRINKAGES}
    stats = Gaussian(train["stats"])
    return {
        "max_softmax": lambda f: -calibration.probabilities(f["logits"]).max(1),
        "energy": lambda f: ood.energy(f["logits"], t),
        **{m: (lambda f, d=d: d.score(f["embeddings"], f["logits"], f["blocks"])) for m, d in fitted.items()},
        "image_statistics": lambda f: stats.distance(f["stats"]),
    }


def flags(score_fns, val: dict[str, np.ndarray], pass_share: float):
    """Each candidate's verdict function (True: flagged), thresholded on ``val`` at ``pass_share``
    and at the stricter :data:`STRICT` (named ``method@share``); the either-or candidate splits the
    flagged share between its two scores."""
    out = {}
    for share, suffix in ((pass_share, ""), (STRICT, f"@{STRICT}")):
        for name, fn in score_fns.items():
            thr = float(np.quantile(fn(val), share, method="higher"))
            out[name + suffix] = lambda f, fn=fn, thr=thr: fn(f) > thr
        half = 1.0 - (1.0 - share) / 2.0
        a, b = score_fns["mahalanobis"], score_fns["image_statistics"]
        ta, tb = (float(np.quantile(g(val), half, method="higher")) for g in (a, b))
        out["mahalanobis_or_statistics" + suffix] = lambda f, a=a, b=b, ta=ta, tb=tb: (a(f) > ta) | (b(f) > tb)
    return out


def subset(f: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in f.items()}


def measure(verdicts, data: dict, halves: dict, half: str) -> dict[str, dict]:
    """Per candidate, on one half: the refused share per kind and pooled, and the flagged shares of
    the test and shifted halves (a refusal: the candidate or the quality checks)."""
    kinds = np.array(data["ood_kinds"])
    rows = {}
    for name, verdict in verdicts.items():
        row: dict[str, float] = {}
        o = subset(data["ood"], halves["ood"] == half)
        refused = verdict(o) | o["refused"]
        k = kinds[halves["ood"] == half]
        row["refused_share"] = float(refused.mean())
        row["by_kind"] = {kind: float(refused[k == kind].mean()) for kind in oodsets.KINDS if (k == kind).any()}
        row["by_kind_detector_only"] = {kind: float(verdict(o)[k == kind].mean()) for kind in row["by_kind"]}
        for split in ("test", "shifted"):
            s = subset(data[split], halves[split] == half)
            row[f"{split}_flagged_share"] = float((verdict(s) | s["refused"]).mean())
        row["meets_targets"] = (
            row["refused_share"] >= TARGETS["refused_share"]
            and row["test_flagged_share"] <= TARGETS["test_flagged_share"]
            and row["shifted_flagged_share"] <= TARGETS["shifted_flagged_share"]
        )
        rows[name] = row
    return rows


def model_data(model_dir: Path, frames: dict, others: list, cache: Path) -> tuple[dict, dict]:
    """Features of one model on the training and validation splits, test, the shifted test and the
    OOD images (kept in ``cache``, an ``.npz`` named by the model's md5 and the OOD draw); the
    temperature and pass share it was fitted with."""
    predictor = load_model(model_dir, device="cpu", engine="torch")
    info = {"temperature": predictor.temperature, "pass_share": predictor.config["ood"]["pass_share"]}
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            data: dict = {}
            for key in z.files:
                split, field = key.split("/")
                data.setdefault(split, {})[field] = z[key]
        return data | {"ood_kinds": [o.kind for o in others]}, info
    img_dir = ROOT / "data/images"
    decode = lambda frame: [images.decode_rgb(f) for f in splits.image_files(frame, img_dir, "benchmark")]  # noqa: E731
    encode = params.load_taxonomy(ROOT / "params.yaml").encode
    test_rgb = decode(frames["test"])
    data = {
        "train": features(predictor, decode(frames["train"])),
        "val": features(predictor, decode(frames["val"])),
        "test": features(predictor, test_rgb),
        "shifted": features(predictor, [shifted(x) for x in test_rgb]),
        "ood": features(predictor, [o.rgb for o in others]),
    }
    data["train"] |= {
        "labels": encode(frames["train"]["dx"], predictor.native_level),
        "block_dims": np.asarray(predictor.model.block_dims()),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"{split}/{k}": v for split, f in data.items() for k, v in f.items()})
    return data | {"ood_kinds": [o.kind for o in others]}, info


def train_small(seed: int, epochs: int, work: Path) -> Path:
    """A model of the small recipe (the train stage, ``epochs`` epochs, ``seed``), trained once."""
    out = work / f"seed{seed}-epochs{epochs}"
    if not (out / "model" / "model.pt").exists():
        cmd = [
            sys.executable,
            "-m",
            "pipeline.stages.train",
            "--set",
            f"train.seed={seed}",
            "--set",
            f"train.epochs={epochs}",
        ]
        cmd += ["--out", str(out / "model"), "--reports", str(out / "reports"), "--no-progress"]
        print(f"training seed {seed} ({epochs} epochs) -> {out}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return out / "model"


def choose(per_model: dict[str, dict]) -> tuple[str, dict[str, dict]]:
    """The candidate with the most refused on the choose halves (mean over the models) among those
    flagging at most the targets' shares of the test and shifted halves for **every** model (the
    gate applies to each model trained, not to their mean); the means of every candidate."""
    means, worst = {}, {}
    for m in CANDIDATES:
        rows = [r["choose"][m] for r in per_model.values()]
        means[m] = {k: float(np.mean([r[k] for r in rows])) for k in TARGETS}
        worst[m] = {k: max(r[k] for r in rows) for k in ("test_flagged_share", "shifted_flagged_share")}
    eligible = [m for m in CANDIDATES if all(worst[m][k] <= TARGETS[k] for k in worst[m])]
    pool = (
        eligible
        or [m for m in CANDIDATES if worst[m]["test_flagged_share"] <= TARGETS["test_flagged_share"]]
        or list(CANDIDATES)
    )
    return max(pool, key=lambda m: means[m]["refused_share"]), means


def spread(per_model: dict[str, dict], method: str) -> dict:
    """Mean, min and max over the models of a method's report-half figures, per kind too."""
    rows = [r["report"][method] for r in per_model.values()]

    def mmm(values: list[float]) -> dict[str, float]:
        return {"mean": round(float(np.mean(values)), 4), "min": round(min(values), 4), "max": round(max(values), 4)}

    out = {k: mmm([r[k] for r in rows]) for k in ("refused_share", "test_flagged_share", "shifted_flagged_share")}
    out["by_kind"] = {kind: mmm([r["by_kind"][kind] for r in rows]) for kind in rows[0]["by_kind"]}
    out["models_meeting_targets"] = sum(r["meets_targets"] for r in rows)
    return out


#: The rows of docs/trust.md's table of the report halves, with what each is there.
TABLE_ROWS = {
    "max_softmax": "max softmax (baseline)",
    "energy": "energy",
    "mahalanobis": "mahalanobis (penultimate, shipped before)",
    "mahalanobis_layers": "mahalanobis_layers (Ledoit-Wolf)",
}


def report_table(result: dict) -> str:
    """docs/trust.md's table: each score's report-half figures (mean, min-max over the models),
    the chosen one in bold (tools/figures.py checks the doc's copy against this JSON)."""

    def pct(v: dict) -> str:
        return f"{100 * v['mean']:.1f} % ({100 * v['min']:.1f}-{100 * v['max']:.1f})".replace("100.0", "100")

    n = len(result["models"])
    lines = [
        "| score | non-dermoscopic refused | test flagged | shifted flagged | models meeting all three targets |",
        "|---|---|---|---|---|",
    ]
    rows = {**TABLE_ROWS, result["chosen"]: f"{result['chosen']} (shipped)"}
    for method, label in rows.items():
        r = result["report"][method]
        cells = [label] + [pct(r[k]) for k in ("refused_share", "test_flagged_share", "shifted_flagged_share")]
        if method == result["chosen"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join([*cells, f"{r['models_meeting_targets']} of {n}"]) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Refused share per kind on the report half: the chosen method and the shipped one (mean over
    models, bars from min to max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result["report"]["mahalanobis"]["by_kind"])
    fig, ax = plt.subplots(figsize=(10, 4.2))
    shown = dict.fromkeys([result["chosen"], "mahalanobis"])
    for i, m in enumerate(shown):
        v = result["report"][m]["by_kind"]
        mean = np.array([v[k]["mean"] for k in kinds])
        err = np.array([[v[k]["mean"] - v[k]["min"] for k in kinds], [v[k]["max"] - v[k]["mean"] for k in kinds]])
        ax.bar(np.arange(len(kinds)) + 0.4 * i - 0.2 * (len(shown) - 1), mean, 0.4, yerr=err, capsize=3, label=m)
    ax.axhline(TARGETS["refused_share"], color="k", ls="--", lw=1, label="target 95 %")
    ax.set_xticks(np.arange(len(kinds)), [k.replace("_", " ") for k in kinds], rotation=25, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="refused (detector or quality check)")
    ax.set_title(f"Held-out half, {len(result['models'])} models (champion + small-recipe seeds)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="models of the small recipe (seeds 1..N)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the small recipe")
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts/benchmarks/ood_seeds", help="the seeds' models")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    t0 = time.perf_counter()
    frames = splits.read_splits(ROOT / "artifacts/splits")
    # the evaluate stage's draw of the synthetic images, so that both measure the same held-out half
    seed = params.load_section("evaluate", ROOT / "params.yaml").seed
    others = oodsets.ood_images(seed)
    halves_ood = np.array([o.half for o in others])
    test_half = lesion_half(frames["test"]["lesion_id"])
    models = {"champion": lambda: ROOT / "artifacts/model"}  # the champion first, then each seed trained when reached
    models |= {f"seed{s}": lambda s=s: train_small(s, args.epochs, args.work) for s in range(1, args.seeds + 1)}
    per_model = {}
    for name, make in models.items():
        folder = make()
        t1 = time.perf_counter()
        md5 = lineage.file_md5(folder / "model.pt")
        data, info = model_data(folder, frames, others, args.work / f"features-{md5[:12]}-seed{seed}.npz")
        verdicts = flags(fit_scores(data["train"], data["val"], info["temperature"]), data["val"], info["pass_share"])
        halves = {"ood": halves_ood, "test": test_half, "shifted": test_half}
        per_model[name] = {
            "model_md5": md5,
            "path": str(folder),
            "choose": measure(verdicts, data, halves, "choose"),
            "report": measure(verdicts, data, halves, "report"),
            "seconds": round(time.perf_counter() - t1, 1),
        }
        r = per_model[name]["report"]
        print(
            name,
            {
                m: (
                    round(r[m]["refused_share"], 3),
                    round(r[m]["test_flagged_share"], 3),
                    round(r[m]["shifted_flagged_share"], 3),
                )
                for m in ("mahalanobis", "mahalanobis_layers", "mahalanobis_layers_s0.1")
            },
            flush=True,
        )
    chosen, choose_means = choose(per_model)
    result = {
        "benchmark": "ood_scores",
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "machine": machine(),
        "model_md5": per_model["champion"]["model_md5"],
        "models": {k: {kk: v[kk] for kk in ("model_md5", "path")} for k, v in per_model.items()},
        "small_recipe": {"epochs": args.epochs, "seeds": list(range(1, args.seeds + 1))},
        "ood_images": {
            h: {k: int(((halves_ood == h) & (np.array([o.kind for o in others]) == k)).sum()) for k in oodsets.KINDS}
            for h in oodsets.HALVES
        },
        "test_images": {h: int((test_half == h).sum()) for h in oodsets.HALVES},
        "targets": TARGETS,
        "chosen": chosen,
        "choose_half_means": choose_means,
        "report": {m: spread(per_model, m) for m in CANDIDATES},
        "per_model": per_model,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(f"chosen on the choose half: {chosen}; report half: {result['report'][chosen]}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
