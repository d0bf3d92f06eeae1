"""The lesion classifier: backbone -> global average pool -> (optional) concatenation with the
encoded metadata (through a small MLP) -> dropout -> linear head.

:meth:`LesionClassifier.embed` returns the penultimate embedding (the vector the head sees), used by
monitoring for drift and by retrieval. :func:`architecture` is the JSON description stored in a
model's config.json; :func:`from_architecture` rebuilds the model from it (untrained, no download).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.model.backbones import backbone_spec
from pipeline.model.metadata import MetadataEncoder


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
        self.input_size = size
        self.backbone = parts.body
        self.neck = parts.neck if parts.neck is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.metadata_dim = metadata_dim
        if metadata_dim > 0:
            self.meta = nn.Sequential(
                nn.Linear(metadata_dim, metadata_hidden),
                nn.ReLU(inplace=True),
                nn.Linear(metadata_hidden, metadata_hidden),
                nn.ReLU(inplace=True),
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

    def blocks(self) -> list[nn.Module]:
        """Four evenly spaced blocks of the backbone (EfficientNet-Lite's MBConv blocks, else the
        body's top-level stages), whose pooled outputs the multi-layer OOD score uses."""
        net = getattr(self.backbone, "net", None)
        found = list(net._blocks) if net is not None and hasattr(net, "_blocks") else list(self.backbone.children())
        n = len(found)
        return [found[max(0, round(n * k / 4) - 1)] for k in (1, 2, 3, 4)]

    def block_dims(self) -> list[int]:
        """The widths of the pooled outputs of :meth:`blocks`, in their order (one probe forward pass
        of the backbone in eval mode, the module's mode restored)."""
        widths: list[int] = []
        hooks = [b.register_forward_hook(lambda _m, _i, o: widths.append(int(o.shape[1]))) for b in self.blocks()]
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.backbone(torch.zeros(1, 3, *self.input_size, device=next(self.parameters()).device))
        finally:
            self.train(was_training)
            for hook in hooks:
                hook.remove()
        return widths

    def embed_with_blocks(
        self, x: torch.Tensor, metadata: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`embed` and the global-average-pooled outputs of :meth:`blocks`, concatenated (N, D)."""
        pooled: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            pooled.append(output.float().mean(dim=(2, 3)) if output.dim() == 4 else output.float().flatten(1))

        hooks = [block.register_forward_hook(keep) for block in self.blocks()]
        try:
            emb = self.embed(x, metadata)
        finally:
            for hook in hooks:
                hook.remove()
        return emb, torch.cat(pooled, dim=1)

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
        backbone,
        num_classes,
        pretrained=pretrained,
        input_size=input_size,
        dropout=dropout,
        metadata_dim=metadata.dim if metadata is not None else 0,
        metadata_hidden=metadata_hidden,
        drop_path=drop_path,
    )


def architecture(
    backbone: str,
    num_classes: int,
    input_size: Sequence[int],
    dropout: float,
    metadata: MetadataEncoder | None,
    metadata_hidden: int = 32,
    drop_path: float | None = None,
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
        arch["backbone"],
        arch["num_classes"],
        pretrained=False,
        input_size=arch["input_size"],
        dropout=arch.get("dropout", 0.0),
        metadata=meta,
        metadata_hidden=arch.get("metadata_hidden", 32),
        drop_path=arch.get("drop_path"),
    )
