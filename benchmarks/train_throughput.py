"""Training throughput: lesionflow's data path vs the DataLoader a user would write.

Same model, resolution, batch and precision in every row (images/s, optimisation steps included):

* (a) model only: forward + backward + optimiser step on synthetic tensors already on the device
  (the ceiling); variants: larger batch, ``torch.compile``, ``torch.compile(mode="max-autotune-no-
  cudagraphs")``/``"reduce-overhead"`` (CUDA graphs);
* (b) lesionflow's real training step (:func:`pipeline.model.training.train_step`): uint8 image bank in
  device memory, batched on-device augmentation (:class:`pipeline.model.datapath.GpuAugment`), model;
  the one-off decode into the bank is timed separately;
* (c) the baseline: an ``ImageFolder``-style dataset (PIL decoding, torchvision transforms: resize,
  flips, rotation, colour jitter, to-tensor, normalise) in a standard ``DataLoader`` (pinned memory,
  persistent workers) at several worker counts, feeding the same model step.

    python benchmarks/train_throughput.py --sizes 150x200 240x320 --workers 4 8 16     # GPU
    python benchmarks/train_throughput.py --sizes 112x150 --batch 32 --workers 0 2 --steps 8   # CPU

Writes ``benchmarks/results/train_throughput.json`` (machine, settings, rows) and prints a table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as pipeline.stages.train: no spinning on a shared CPU

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core import params
from pipeline.model import backbones, classifier, datapath, training
from pipeline.model.augment import GpuAugment


def machine() -> dict:
    d = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    return d


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_model(backbone, size, device, cl, compile_mode=None):
    torch.manual_seed(0)
    m = classifier.build_model(backbone, 7, pretrained=False, input_size=size).to(device)
    if cl:
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = m
    if compile_mode == "default":
        fwd = torch.compile(m)
    elif compile_mode:
        fwd = torch.compile(m, mode=compile_mode)
    return m, fwd, opt


def model_step(fwd, opt, x, y, amp, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = fwd(x, None)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - t


def row_a(backbone, size, batch, device, amp, cl, steps, warmup, compile_mode=None):
    _, fwd, opt = make_model(backbone, size, device, cl, compile_mode)
    x = torch.randn(batch, 3, *size, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,), device=device)
    dt = timed(lambda: model_step(fwd, opt, x, y, amp, device), steps, warmup + (3 if compile_mode else 0), device)
    return steps * batch / dt


def row_b(backbone, size, batch, device, amp, cl, steps, warmup, u8, labels):
    m, fwd, opt = make_model(backbone, size, device, cl)
    bank = datapath.ImageBank.create(u8, labels, None, device, pin=True)
    spec = backbones.backbone_spec(backbone)
    aug = GpuAugment(params.AugmentParams(), spec.mean, spec.std)
    gen = torch.Generator().manual_seed(0)
    weight = torch.tensor(
        training.class_weights(np.bincount(labels, minlength=7), 0.5), dtype=torch.float32, device=device
    )
    p = params.from_dict(
        params.TrainParams, {"channels_last": cl, "label_smoothing": 0.1, "batch_size": batch}, "train"
    )
    run = training.Run(
        p=p,
        raw=m,
        fwd=fwd,
        opt=opt,
        sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        aug=aug,
        aug_gen=gen,
        weight=weight,
        sample_weights=None,
        dd=training.Dist(),
        device=device,
        amp=amp,
        steps_per_epoch=0,
    )
    state = {"order": iter(())}

    def step():
        try:
            idx = next(state["order"])
        except StopIteration:
            order = torch.randperm(len(bank), generator=gen)
            state["order"] = (g for g, _ in datapath.rank_batches(order, batch, 0, 1) if g.numel() == batch)
            idx = next(state["order"])
        u = aug.params(idx.numel(), gen)
        training.train_step(run, bank, idx, u)

    return steps * batch / timed(step, steps, warmup, device)


class FolderDataset(torch.utils.data.Dataset):
    """What a user would write: one JPEG opened with PIL per item, torchvision transforms."""

    def __init__(self, files, labels, size, mean, std):
        from torchvision import transforms as T

        self.files, self.labels = files, labels
        self.tf = T.Compose(
            [
                T.Resize(size),
                T.RandomHorizontalFlip(),
                T.RandomVerticalFlip(),
                T.RandomAffine(180, translate=(0.05, 0.05), scale=(0.9, 1.15)),
                T.ColorJitter(0.2, 0.2, 0.2, 0.03),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            return self.tf(img.convert("RGB")), int(self.labels[i])


def row_c(backbone, size, batch, device, amp, cl, steps, warmup, files, labels, workers):
    _, fwd, opt = make_model(backbone, size, device, cl)
    spec = backbones.backbone_spec(backbone)
    ds = FolderDataset(files, labels, size, spec.mean, spec.std)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    it = iter(dl)

    def step():
        nonlocal it
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(dl)
            x, y = next(it)
        x = x.to(device, non_blocking=True)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        model_step(fwd, opt, x, y.to(device, non_blocking=True), amp, device)

    return steps * batch / timed(step, steps, warmup, device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--sizes", nargs="+", default=["150x200", "240x320"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--images", type=int, default=4096, help="images in the bank / folder dataset")
    ap.add_argument("--splits", type=Path, default=ROOT / "artifacts/splits/train.csv")
    ap.add_argument("--images-dir", type=Path, default=ROOT / "data/images")
    ap.add_argument("--a-variants", default="batch256,compile", help="comma list: batch256, compile, cudagraphs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/train_throughput.json")
    a = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    cl = True  # as pipeline.stages.train (train.channels_last: faster on CUDA and on the CPU)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    frame = pd.read_csv(a.splits).head(a.images)
    from pipeline.core.taxonomy import Taxonomy

    labels = Taxonomy.default().encode(frame["dx"])
    files = [a.images_dir / f"{i}.jpg" for i in frame["image_id"]]
    rows = []
    out = {
        "benchmark": "train_throughput",
        "machine": machine(),
        "backbone": a.backbone,
        "steps": a.steps,
        "warmup": a.warmup,
        "rows": rows,
        "complete": False,
        "command": "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a run cut short by a time limit keeps what it measured
        a.out.write_text(json.dumps(out, indent=2) + "\n")

    def add(row, variant, size, ips, **extra):
        r = {"row": row, "variant": variant, "size": size, "images_per_s": round(ips, 1), **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)
        save()

    for s in a.sizes:
        h, w = (int(v) for v in s.split("x"))
        size = (h, w)
        common = {"batch": a.batch, "precision": "bf16" if amp else "fp32", "channels_last": cl}
        add(
            "a",
            "model only, synthetic on device",
            s,
            row_a(a.backbone, size, a.batch, device, amp, cl, a.steps, a.warmup),
            **common,
        )
        t = time.perf_counter()
        u8 = datapath.load_images(files, h, w, workers=0, progress=False)
        decode_s = time.perf_counter() - t
        add(
            "b",
            "lesionflow: uint8 bank on device + batched device augmentation",
            s,
            row_b(a.backbone, size, a.batch, device, amp, cl, a.steps, a.warmup, u8, labels),
            one_off_decode_s=round(decode_s, 2),
            one_off_decode_images=len(files),
            **common,
        )
        del u8
        for nw in a.workers:
            add(
                "c",
                f"baseline: PIL + torchvision transforms, DataLoader({nw} workers)",
                s,
                row_c(a.backbone, size, a.batch, device, amp, cl, a.steps, a.warmup, files, labels, nw),
                workers=nw,
                **common,
            )
        variants = [v for v in a.a_variants.split(",") if v]
        if "batch256" in variants:
            add(
                "a",
                "model only, batch 256",
                s,
                row_a(a.backbone, size, 256, device, amp, cl, max(4, a.steps // 2), a.warmup),
                **{**common, "batch": 256},
            )
        if "compile" in variants:
            t = time.perf_counter()
            ips = row_a(a.backbone, size, a.batch, device, amp, cl, a.steps, a.warmup, "default")
            add("a", "model only, torch.compile", s, ips, compile_s=round(time.perf_counter() - t, 1), **common)
        if "cudagraphs" in variants and device.type == "cuda":
            t = time.perf_counter()
            ips = row_a(a.backbone, size, a.batch, device, amp, cl, a.steps, a.warmup, "max-autotune-no-cudagraphs")
            add(
                "a",
                "model only, torch.compile max-autotune",
                s,
                ips,
                compile_s=round(time.perf_counter() - t, 1),
                **common,
            )
    out["complete"] = True
    save()
    print(f"\n{out['machine']}\n| row | variant | size | batch | images/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['variant']} | {r['size']} | {r['batch']} | {r['images_per_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
