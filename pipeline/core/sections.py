"""The schemas of ``params.yaml``: one typed, frozen dataclass per section, registered with
:func:`section`, each checking its own values in ``__post_init__`` (a failure names the key,
:func:`pipeline.core.strict.fail`). The pipeline's stages' sections are here; the running
service's and the monitoring's (``serving``, ``monitor``) are :mod:`pipeline.core.servicesections`.
Reading the file is :mod:`pipeline.core.params`, which imports both; standard library only.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, TypeVar

from pipeline.core import taxonomy
from pipeline.core.formats import IMAGE_EXTENSIONS, SizeLimits
from pipeline.core.statsconfig import FeatureConfig
from pipeline.core.strict import fail

T = TypeVar("T")

_SECTIONS: dict[str, type] = {}


def section(name: str):
    """Class decorator: register a dataclass as the schema of ``params.yaml``'s section ``name``."""

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        _SECTIONS[name] = cls
        return cls

    return register


def sections() -> dict[str, type]:
    """The registered section names and their schema classes (those of every module imported
    so far: :mod:`pipeline.core.params` imports them all)."""
    return dict(_SECTIONS)


@section("labels")
@dataclasses.dataclass(frozen=True)
class LabelsParams:
    """Diagnoses and their mapping to risk classes and to binary benign/malignant."""

    diagnoses: list[str]
    risk: dict[str, list[str]]
    binary: dict[str, list[str]]
    binary_positive: str = "malignant"

    def __post_init__(self) -> None:
        try:
            self.taxonomy()
        except taxonomy.TaxonomyError as exc:
            fail(exc.key, exc.message)

    def taxonomy(self) -> taxonomy.Taxonomy:
        return taxonomy.Taxonomy.from_mapping(
            self.diagnoses, self.risk, self.binary, binary_positive=self.binary_positive
        )


@section("metadata")
@dataclasses.dataclass(frozen=True)
class MetadataParams:
    """The metadata vocabulary, shared by the data contract (stage ``validate``) and the model's
    metadata encoder (stage ``train``, stored in every model's config for the service)."""

    dx_types: list[str]
    sexes: list[str]
    localizations: list[str]
    unknown: str = "unknown"  # the value that means "not recorded" (encoded as missing)
    age_min: float = 0.0
    age_max: float = 120.0

    def __post_init__(self) -> None:
        for name in ("dx_types", "sexes", "localizations"):
            values = getattr(self, name)
            if not values:
                fail(name, "must list at least one value")
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                fail(name, f"listed more than once: {', '.join(dup)}")
        if not 0 <= self.age_min < self.age_max:
            fail("age_max", f"must be greater than age_min >= 0, got {self.age_min}..{self.age_max}")

    def known(self, name: str) -> list[str]:
        """The values of ``sexes`` or ``localizations`` other than :attr:`unknown`."""
        return [v for v in getattr(self, name) if v != self.unknown]


@section("validate")
@dataclasses.dataclass(frozen=True)
class ValidateParams:
    """The data contract: what the metadata and the image files must satisfy (the vocabularies of
    the metadata columns are the ``metadata`` section)."""

    image_id_pattern: str = r"^ISIC_\d{7}$"
    required_columns: list[str] = dataclasses.field(
        default_factory=lambda: ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    )
    min_width: int = SizeLimits.min_width
    min_height: int = SizeLimits.min_height
    max_aspect_ratio: float = SizeLimits.max_aspect_ratio
    image_extensions: list[str] = dataclasses.field(default_factory=lambda: list(IMAGE_EXTENSIONS))
    require_rgb: bool = True
    workers: int = 0
    max_examples: int = 5
    near_duplicates: str = "warn"  # copies of one image under two lesion_ids: warn | error | off
    near_duplicate_min_detail: float = 0.86  # detail similarity that confirms a copy (0..1)

    def __post_init__(self) -> None:
        if self.near_duplicates not in ("warn", "error", "off"):
            fail("near_duplicates", f"must be warn, error or off, got {self.near_duplicates!r}")
        if not 0 < self.near_duplicate_min_detail <= 1:
            fail("near_duplicate_min_detail", f"must be in (0, 1], got {self.near_duplicate_min_detail}")
        try:
            re.compile(self.image_id_pattern)
        except re.error as exc:
            fail("image_id_pattern", f"not a valid regular expression ({exc}): {self.image_id_pattern!r}")
        if self.min_width < 1 or self.min_height < 1:
            fail("min_width", "min_width and min_height must be at least 1")
        if self.max_aspect_ratio < 1:
            fail("max_aspect_ratio", f"must be at least 1 (longer side / shorter side), got {self.max_aspect_ratio}")
        if self.workers < 0:
            fail("workers", f"must be 0 (all cores) or a positive count, got {self.workers}")
        if self.max_examples < 1:
            fail("max_examples", f"must be at least 1, got {self.max_examples}")
        for i, ext in enumerate(self.image_extensions):
            if ext.lower() not in IMAGE_EXTENSIONS:
                fail(
                    f"image_extensions[{i}]",
                    f"{ext!r} is not an image type lesionflow decodes ({', '.join(IMAGE_EXTENSIONS)})",
                )

    def size_limits(self) -> SizeLimits:
        """The image sizes the contract accepts (and so the sizes a model trained on them can judge)."""
        return SizeLimits(self.min_width, self.min_height, self.max_aspect_ratio)


@section("split")
@dataclasses.dataclass(frozen=True)
class SplitParams:
    """Train/val/test split grouped by lesion (and patient), stratified by diagnosis."""

    seed: int = 42
    train_fraction: float = 0.70
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    group_column: str = "lesion_id"
    patient_column: str = "patient_id"
    stratify_column: str = "dx"

    def __post_init__(self) -> None:
        for name in ("train_fraction", "val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                fail(name, f"must be in (0, 1), got {value}")
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            fail("test_fraction", f"train + val + test fractions must sum to 1, got {total:.4f}")


@dataclasses.dataclass(frozen=True)
class GatesParams:
    """Absolute thresholds and no-regression margins (vs the champion) of dotted metric names."""

    absolute: dict[str, float] = dataclasses.field(default_factory=dict)
    regression_margin: dict[str, float] = dataclasses.field(default_factory=dict)
    lower_is_better: list[str] = dataclasses.field(default_factory=list)

    #: What a gated metric name may start with: a label level, or ``ood`` (the OOD detector).
    GROUPS = (*taxonomy.LEVELS, "ood")

    def __post_init__(self) -> None:
        for group in ("absolute", "regression_margin"):
            for name, value in getattr(self, group).items():
                level = name.split(".", 1)[0]
                if "." not in name or level not in self.GROUPS:
                    fail(f"{group}.{name}", f"metric names are <{'|'.join(self.GROUPS)}>.<metric>, got {name!r}")
                if group == "regression_margin" and value < 0:
                    fail(f"{group}.{name}", f"margin must be >= 0, got {value}")
        for name in self.lower_is_better:
            if name not in self.absolute and name not in self.regression_margin:
                fail("lower_is_better", f"{name!r} is not a gated metric")


@section("evaluate")
@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """Evaluation: metrics, operating point, subgroups, explanations, gates, model card."""

    target_sensitivity: float = 0.95
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 42
    batch_size: int = 64
    calibration_bins: int = 10
    curve_points: int = 200
    age_bands: list[float] = dataclasses.field(default_factory=lambda: [0, 30, 45, 60, 75])
    localization_groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    subgroup_margin: float = 0.10
    subgroup_min_positives: int = 10
    gradcam_per_class: int = 4
    gates: GatesParams = dataclasses.field(default_factory=GatesParams)

    def __post_init__(self) -> None:
        if not 0.0 < self.target_sensitivity <= 1.0:
            fail("target_sensitivity", f"must be in (0, 1], got {self.target_sensitivity}")
        if self.bootstrap != 0 and self.bootstrap < 100:
            fail("bootstrap", f"must be 0 (no CIs) or at least 100 resamples, got {self.bootstrap}")
        if not 0.5 < self.confidence < 1.0:
            fail("confidence", f"must be in (0.5, 1), got {self.confidence}")
        for name in ("batch_size", "calibration_bins", "curve_points"):
            if getattr(self, name) < 1:
                fail(name, f"must be at least 1, got {getattr(self, name)}")
        if self.gradcam_per_class < 0:
            fail("gradcam_per_class", f"must be >= 0, got {self.gradcam_per_class}")
        if not self.age_bands or any(b >= a for b, a in zip(self.age_bands, self.age_bands[1:])):
            fail("age_bands", f"must be a non-empty, strictly increasing list of ages, got {self.age_bands}")
        if not 0.0 <= self.subgroup_margin < 1.0:
            fail("subgroup_margin", f"must be in [0, 1), got {self.subgroup_margin}")
        if self.subgroup_min_positives < 1:
            fail("subgroup_min_positives", f"must be at least 1, got {self.subgroup_min_positives}")
        seen: dict[str, str] = {}
        for group, members in self.localization_groups.items():
            for loc in members:
                if loc in seen:
                    fail(f"localization_groups.{group}", f"{loc!r} is also in group {seen[loc]!r}")
                seen[loc] = group


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Batched on-device augmentation (:class:`pipeline.model.augment.GpuAugment`)."""

    enabled: bool = True
    hflip: bool = True
    vflip: bool = True
    rotate_degrees: float = 180.0
    scale: list[float] = dataclasses.field(default_factory=lambda: [0.9, 1.15])
    translate: float = 0.05
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03

    def __post_init__(self) -> None:
        if not 0.0 <= self.rotate_degrees <= 180.0:
            fail("rotate_degrees", f"must be in [0, 180], got {self.rotate_degrees}")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1]:
            fail("scale", f"must be [low, high] with 0 < low <= high, got {self.scale}")
        for name in ("translate", "brightness", "contrast", "saturation", "hue"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, f"must be in [0, 1), got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TrustParams:
    """What makes the model's answers trustworthy, fitted after training and stored with the model:
    temperature scaling on val (:mod:`pipeline.model.calibration`) and the out-of-distribution
    detector (:mod:`pipeline.model.ood`; threshold: ``ood_pass_share`` of val passes; the multi-layer
    score's covariance shrinkage ``ood_shrinkage``, null: Ledoit-Wolf's estimate), and the
    image-quality checks (:mod:`pipeline.model.quality`; thresholds at the ``quality_quantile``
    tails of the training split's images; 0: no checks)."""

    calibration: Literal["temperature", "none"] = "temperature"
    ood_method: Literal["mahalanobis_layers", "mahalanobis", "energy", "none"] = "mahalanobis_layers"
    ood_pass_share: float = 0.99
    ood_shrinkage: float | None = 0.1
    quality_quantile: float = 0.001

    def __post_init__(self) -> None:
        if not 0.5 <= self.ood_pass_share < 1.0:
            fail("ood_pass_share", f"must be in [0.5, 1), got {self.ood_pass_share}")
        if self.ood_shrinkage is not None and not 0.0 <= self.ood_shrinkage <= 1.0:
            fail("ood_shrinkage", f"must be in [0, 1] (or null: Ledoit-Wolf's estimate), got {self.ood_shrinkage}")
        if not 0.0 <= self.quality_quantile < 0.05:
            fail("quality_quantile", f"must be in [0, 0.05) (0: no checks), got {self.quality_quantile}")


@section("train")
@dataclasses.dataclass(frozen=True)
class TrainParams:
    """Training: backbone, target level, imbalance handling, schedule, data path, precision."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    target_level: Literal["dx", "risk", "binary"] = "dx"
    input_size: list[int] = dataclasses.field(default_factory=lambda: [112, 150])  # [H, W]
    metadata_fusion: bool = False
    dropout: float = 0.2
    drop_path: float | None = None
    freeze_bn: bool = False
    epochs: int = 4
    batch_size: int = 32  # global batch (split across DDP ranks)
    eval_batch_size: int = 128
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 0.001
    backbone_lr_mult: float = 1.0
    min_lr_ratio: float = 0.01
    warmup_epochs: float = 0.5
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    imbalance: Literal["class_weights", "sampler", "none"] = "class_weights"
    class_weight_power: float = 0.5
    sampler_power: float = 0.5
    augment: AugmentParams = dataclasses.field(default_factory=AugmentParams)
    early_stopping_metric: Literal["balanced_accuracy", "accuracy", "macro_auc", "binary_auc", "loss"] = (
        "balanced_accuracy"
    )
    patience: int = 5
    tta: bool = True
    seed: int = 42
    deterministic: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    cudnn_benchmark: bool = True
    compile: bool = False
    device: str = "auto"
    cache: bool = True
    decode_workers: int = 0
    trust: TrustParams = dataclasses.field(default_factory=TrustParams)

    def __post_init__(self) -> None:
        if len(self.input_size) != 2 or min(self.input_size) < 16:
            fail("input_size", f"must be [height, width], each at least 16, got {self.input_size}")
        for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
            if getattr(self, name) < 1:
                fail(name, f"must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            fail("lr", f"must be positive, got {self.lr}")
        if not 0.0 <= self.backbone_lr_mult <= 10.0:
            fail("backbone_lr_mult", f"must be in [0, 10], got {self.backbone_lr_mult}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.warmup_epochs < self.epochs:
            fail("warmup_epochs", f"must be in [0, epochs), got {self.warmup_epochs}")
        if self.weight_decay < 0:
            fail("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.label_smoothing < 1.0:
            fail("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            fail("drop_path", f"must be empty (backbone default) or in [0, 1), got {self.drop_path}")
        for name in ("class_weight_power", "sampler_power"):
            if not 0.0 <= getattr(self, name) <= 2.0:
                fail(name, f"must be in [0, 2], got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            fail("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.decode_workers < 0:
            fail("decode_workers", f"must be 0 (all cores) or a positive count, got {self.decode_workers}")
        # the backbone name is checked against the registry by the train stage (pipeline.model)


@section("retrieval")
@dataclasses.dataclass(frozen=True)
class RetrievalParams:
    """Similar confirmed cases (stage ``retrieval``, the service's ``/similar``, evaluate's kNN
    evidence): how many cases, and the thumbnails packaged with the model."""

    k: int = 6
    thumbnail_size: list[int] = dataclasses.field(default_factory=lambda: [75, 100])
    thumbnail_quality: int = 80
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 50:
            fail("k", f"must be in [1, 50], got {self.k}")
        if len(self.thumbnail_size) != 2 or min(self.thumbnail_size) < 16:
            fail("thumbnail_size", f"must be [height, width], each at least 16, got {self.thumbnail_size}")
        if not 10 <= self.thumbnail_quality <= 95:
            fail("thumbnail_quality", f"must be in [10, 95], got {self.thumbnail_quality}")
        if self.batch_size < 1:
            fail("batch_size", f"must be at least 1, got {self.batch_size}")


@section("review")
@dataclasses.dataclass(frozen=True)
class ReviewParams:
    """Label review (stage ``review``): out-of-fold probabilities of every labelled image from a
    lesion-grouped ``folds``-fold logistic regression (inverse regularisation ``c``) on the first
    ``components`` whitened principal components of the model's embeddings, confident learning
    over them; beside each suspect its ``similar`` most similar images of other lesions confirmed
    as ``confirmed`` says, and the contact sheet's first ``sheet_rows`` suspects."""

    folds: int = 5
    components: int = 128
    c: float = 0.01
    max_iter: int = 2000
    seed: int = 0
    batch_size: int = 64
    similar: int = 3
    sheet_rows: int = 24
    confirmed: list[str] = dataclasses.field(default_factory=lambda: ["histo"])

    def __post_init__(self) -> None:
        if not 2 <= self.folds <= 20:
            fail("folds", f"must be in [2, 20], got {self.folds}")
        if not self.c > 0:
            fail("c", f"must be positive, got {self.c}")
        for name in ("components", "max_iter", "batch_size", "similar", "sheet_rows"):
            if getattr(self, name) < 1:
                fail(name, f"must be at least 1, got {getattr(self, name)}")
        if not self.confirmed or not all(str(t).strip() for t in self.confirmed):
            fail("confirmed", f"must name at least one dx_type, got {self.confirmed}")


@section("eda")
@dataclasses.dataclass(frozen=True)
class EdaParams:
    """Image statistics (``features``: :class:`FeatureConfig`), the report and the feature-only
    baseline."""

    workers: int = 0  # processes (0 = all cores)
    chunk_size: int = 64  # images per task
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    grid_per_class: int = 6
    seed: int = 0
    baseline_level: Literal["dx", "risk", "binary"] = "dx"
    baseline_c: float = 1.0
    baseline_max_iter: int = 3000
    permutation_repeats: int = 5
    top_features: int = 20

    def __post_init__(self) -> None:
        if self.workers < 0:
            fail("workers", f"must be 0 (all cores) or a positive count, got {self.workers}")
        for name in ("chunk_size", "grid_per_class", "baseline_max_iter", "permutation_repeats", "top_features"):
            if getattr(self, name) < 1:
                fail(name, f"must be at least 1, got {getattr(self, name)}")
        if not self.baseline_c > 0:
            fail("baseline_c", f"must be positive, got {self.baseline_c}")
