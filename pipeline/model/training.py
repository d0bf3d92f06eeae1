"""The training loop, in the shape of torchvision's ``references/classification``: a flat loop
split into :func:`train_one_epoch` and :func:`evaluate`, plus what they need (loss weights, the
optimiser and schedule, data-parallel set-up, validation metrics).

* loss: the per-sample mean of the class-weighted (or sampler-balanced), label-smoothed
  cross-entropy, so that DDP's gradient averaging over equal shards equals one big batch;
* AdamW (or SGD with Nesterov momentum) without weight decay on norms and biases, the backbone at
  ``backbone_lr_mult`` times the head's learning rate; linear warm-up then cosine decay per step;
* bf16 autocast on CUDA, channels_last, optional ``torch.compile``;
* DDP under ``torchrun`` (NCCL on GPUs, gloo on CPU): every rank draws the same epoch order and
  augmentation numbers and takes every ``world``-th sample of each global batch
  (:func:`pipeline.model.datapath.rank_batches`), so the ranks' shards are disjoint and together
  are exactly the single process's epoch; BatchNorm buffers are broadcast from rank 0 before
  validation, so all ranks early-stop identically.

Imports torch, NumPy and scikit-learn only (plus :mod:`pipeline.core`): it runs on a bare GPU machine.
"""

from __future__ import annotations

import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn import metrics as skm

from pipeline.core.errors import LesionflowError
from pipeline.core.params import TrainParams
from pipeline.core.taxonomy import Taxonomy
from pipeline.model import datapath
from pipeline.model.augment import GpuAugment, flip_views
from pipeline.model.inference import derive_levels, level_matrix


class TrainError(LesionflowError, RuntimeError):
    """A user-causable problem with a training run (a setting this machine cannot run)."""


# ----------------------------------------------------------------------------------------------
# pure helpers


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


def _macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    present = np.unique(y)
    try:
        if probs.shape[1] == 2:
            return float(skm.roc_auc_score(y, probs[:, 1]))
        p = probs[:, present] / probs[:, present].sum(1, keepdims=True)
        if len(present) == 2:
            return float(skm.roc_auc_score(y == present[1], p[:, 1]))
        return float(skm.roc_auc_score(y, p, multi_class="ovr", labels=present, average="macro"))
    except ValueError:
        return float("nan")


def classification_metrics(probs: np.ndarray, y: np.ndarray, level: str, tax: Taxonomy) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy, macro one-vs-rest AUC and binary (malignant) AUC."""
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(1)
    out = {
        "loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)))),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
        "macro_auc": _macro_auc(y, probs),
    }
    binary = derive_levels(probs, level, tax)["binary"]
    if binary is not None:
        y_bin = level_matrix(tax, level, "binary")[y].argmax(1) == tax.positive_index
        try:
            out["binary_auc"] = float(skm.roc_auc_score(y_bin, binary[:, tax.positive_index]))
        except ValueError:
            out["binary_auc"] = float("nan")
    return out


def better(metric: str, new: float, best: float | None) -> bool:
    """Whether ``new`` improves on ``best`` (lower for ``loss``, higher otherwise; NaN never does)."""
    if best is None or (isinstance(best, float) and math.isnan(best)):
        return not math.isnan(new)
    if math.isnan(new):
        return False
    return new < best if metric == "loss" else new > best


# ----------------------------------------------------------------------------------------------
# the machine: devices, processes, seeds


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_param: str) -> tuple[Dist, torch.device]:
    """The process group (under torchrun) and this rank's device for ``train.device``."""
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
    """Seed Python, NumPy and torch; deterministic kernels when asked."""
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


def describe_device(device: torch.device, world: int) -> dict[str, Any]:
    """Where a model was trained (stored in its config)."""
    d = {
        "type": device.type,
        "world_size": world,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


# ----------------------------------------------------------------------------------------------
# optimiser and schedule


def param_groups(model: torch.nn.Module, p: TrainParams) -> list[dict[str, Any]]:
    """Four groups: (backbone | head) x (decayed weights | norms and biases, not decayed)."""
    buckets: dict[tuple[bool, bool], list] = {(b, d): [] for b in (True, False) for d in (True, False)}
    for name, prm in model.named_parameters():
        buckets[(name.startswith("backbone."), prm.ndim > 1)].append(prm)
    return [
        {"params": ps, "weight_decay": p.weight_decay if dec else 0.0, "lr": p.lr * (p.backbone_lr_mult if bb else 1.0)}
        for (bb, dec), ps in buckets.items()
        if ps
    ]


def optimiser(model: torch.nn.Module, p: TrainParams, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or SGD with Nesterov momentum over :func:`param_groups`."""
    groups = param_groups(model, p)
    if p.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=p.lr, fused=device.type == "cuda")
    return torch.optim.SGD(groups, lr=p.lr, momentum=0.9, nesterov=True)


def scheduler(opt: torch.optim.Optimizer, p: TrainParams, steps_per_epoch: int) -> Any:
    """Per-step linear warm-up then cosine decay (:func:`lr_lambda`)."""
    total = steps_per_epoch * p.epochs
    warm = int(round(p.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, total, warm, p.min_lr_ratio))


def steps_per_epoch(n_train: int, batch_size: int, world: int) -> int:
    """Optimiser steps per epoch (the epoch order is padded to a multiple of the ranks)."""
    padded = int(math.ceil(n_train / world)) * world
    return int(math.ceil(padded / batch_size))


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass
class Run:
    """What one training run holds: the model (``raw``: unwrapped; ``fwd``: what the loop calls,
    DDP- and compile-wrapped), optimiser, schedule, augmentation, loss weighting and settings."""

    p: TrainParams
    raw: torch.nn.Module
    fwd: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    aug: GpuAugment
    aug_gen: torch.Generator
    weight: torch.Tensor | None
    sample_weights: np.ndarray | None
    dd: Dist
    device: torch.device
    amp: bool
    steps_per_epoch: int


def train_step(
    run: Run, bank: datapath.ImageBank, idx: torch.Tensor, u: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on the bank's images ``idx`` (augmented with ``u``); returns the
    (detached) loss and the labels."""
    x, y, m = bank.batch(idx)
    x = run.aug(x.to(run.device, non_blocking=True), u)
    y = y.to(run.device, non_blocking=True)
    m = m.to(run.device) if m is not None else None
    if run.p.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
        logits = run.fwd(x, m)
    loss = F.cross_entropy(
        logits.float(), y, weight=run.weight, label_smoothing=run.p.label_smoothing, reduction="none"
    ).mean()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    run.sched.step()
    return loss.detach(), y


def _train_mode(run: Run) -> None:
    run.fwd.train()
    if run.p.freeze_bn:  # BatchNorm uses (and keeps) its running statistics; affine params train
        for mod in run.raw.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()


def train_one_epoch(
    run: Run, bank: datapath.ImageBank, epoch: int, progress: bool = True, shard_log: list[int] | None = None
) -> dict[str, float]:
    """One pass over this rank's shard of the epoch; returns ``train_loss`` (over every rank),
    ``images`` (every rank's) and ``seconds``. ``shard_log`` collects the indices this rank saw."""
    _train_mode(run)
    batches = datapath.rank_batches(
        epoch_order(len(bank), epoch, run.p.seed, run.sample_weights), run.p.batch_size, run.dd.rank, run.dd.world
    )
    if progress and run.dd.main:
        from tqdm import tqdm

        batches = tqdm(
            batches,
            total=run.steps_per_epoch,
            desc=f"epoch {epoch}/{run.p.epochs}",
            unit="batch",
            leave=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
    _sync(run.device)
    t0 = time.perf_counter()
    loss_sum, seen = torch.zeros((), device=run.device), 0
    for step, (gidx, idx) in enumerate(batches):
        # augmentation numbers are drawn for the global batch, then sliced like the indices
        u = run.aug.params(gidx.numel(), run.aug_gen) if run.p.augment.enabled else None
        if u is not None:
            u = u[run.dd.rank :: run.dd.world]
        if shard_log is not None:
            shard_log.extend(idx.tolist())
        loss, y = train_step(run, bank, idx, u)
        loss_sum += loss * y.numel()
        seen += y.numel()
        if progress and run.dd.main and step % 20 == 0:
            batches.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.sched.get_last_lr()[0]:.2e}")
    _sync(run.device)
    seconds = time.perf_counter() - t0
    if run.dd.world > 1:
        # BN running stats drift apart between ranks: take rank 0's, so every rank validates
        # (and early-stops) identically
        for buf in run.raw.buffers():
            dist.broadcast(buf, 0)
        tot = torch.stack([loss_sum, torch.tensor(float(seen), device=run.device)])
        dist.all_reduce(tot)
        loss_sum, seen = tot[0], int(tot[1].item())
    return {"train_loss": float(loss_sum.item() / max(1, seen)), "images": seen, "seconds": seconds}


@torch.no_grad()
def evaluate(run: Run, bank: datapath.ImageBank, tta: bool = False) -> np.ndarray:
    """Softmax probabilities of every image in ``bank`` (eval mode; flips averaged with ``tta``)."""
    model = run.raw
    model.eval()
    out = []
    for s in range(0, len(bank), run.p.eval_batch_size):
        x, _, m = bank.batch(torch.arange(s, min(s + run.p.eval_batch_size, len(bank))))
        x = run.aug(x.to(run.device, non_blocking=True), None)
        if run.p.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        m = m.to(run.device) if m is not None else None
        views = flip_views(x) if tta else [x]
        p = 0
        for v in views:
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
                p = p + torch.softmax(model(v, m).float(), dim=1)
        out.append((p / len(views)).cpu().numpy())
    return np.concatenate(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
