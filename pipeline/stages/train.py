"""Stage ``train``: fine-tune an ImageNet backbone on the train split, early-stop on validation.

    python -m pipeline.stages.train                                  # params.yaml's train section
    python -m pipeline.stages.train --override params-gpu.yaml       # the GPU recipe
    python -m pipeline.stages.train --set train.epochs=30 --set train.input_size=[240,320]
    torchrun --nproc_per_node=N -m pipeline.stages.train ...          # DistributedDataParallel

The steps (the data, the run and the patience loop are :mod:`pipeline.model.fitting`, one epoch
:mod:`pipeline.model.training`):

1. read ``artifacts/splits/{train,val}.csv``; encode targets at ``train.target_level``;
2. decode every image once into a uint8 cache (:mod:`pipeline.model.datapath`), held on the
   device and augmented there in whole batches;
3. epoch 0 validates the untrained model; then one epoch of training and a validation per epoch,
   keeping the best by ``train.early_stopping_metric``, with ``train.patience``;
4. fit the temperature on val and the out-of-distribution detector (train statistics, val
   threshold) through the prediction path (:mod:`pipeline.model.trust`);
5. write ``artifacts/model/`` (``model.pt`` + ``config.json`` + ``ood.npz``:
   :mod:`pipeline.model.checkpoint`) whole or not at all, and ``reports/train/``
   (:func:`pipeline.model.report.write_reports`).

Imports only torch, torchvision, numpy, pandas, scikit-learn, pillow, pyyaml (+ the EfficientNet-
Lite package for that backbone): it runs on a bare GPU machine.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared CPU machine (other jobs busy) spinning
# threads make each training step several times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
import time  # noqa: E402
from argparse import ArgumentParser, Namespace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch.distributed as dist  # noqa: E402

from pipeline.core import params, stagecli  # noqa: E402
from pipeline.core.errors import EXIT_OK  # noqa: E402
from pipeline.core.formats import SizeLimits  # noqa: E402
from pipeline.core.layout import LAYOUT  # noqa: E402
from pipeline.core.taxonomy import Taxonomy  # noqa: E402
from pipeline.model import checkpoint, fitting, report, training  # noqa: E402
from pipeline.model.metadata import MetadataEncoder  # noqa: E402


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
    fitting.check_backbone(p)
    encoder = MetadataEncoder.from_params(vocabulary) if p.metadata_fusion else None
    sources = fitting.Sources(args.splits, args.images, args.cache_dir, progress=not args.no_progress)
    data = fitting.load_data(p, tax, encoder, sources, dd, device)
    run = fitting.build_run(p, tax, encoder, data, dd, device)
    if dd.main:
        print(f"train: {fitting.describe_run(run, data, tax)}", flush=True)
    history, best = fitting.fit(run, data, tax, progress=not args.no_progress)
    result = fitting.final_result(run, data, tax, history, best, time.perf_counter() - wall0)
    if dd.main:
        info = fitting.run_info(run, data)
        config = fitting.model_config(run, tax, vocabulary, limits, args.splits, result, info["device"])
        fitted = fitting.fit_trust(run, data, config)
        config.update(calibration=fitted.calibration, ood=fitted.ood, quality=fitted.quality)
        checkpoint.save(args.out, best["state"], config, fitted.arrays)
        report.write_reports(args.reports, history, result, info, config["lineage"])
        print(f"train: {fitting.describe_result(result, p.tta)} -> {args.out}", flush=True)
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
