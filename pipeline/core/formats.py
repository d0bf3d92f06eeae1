"""The images lesionflow accepts: PIL's format names and their file extensions, and the sizes a
model can judge (shared by the decoder, :mod:`pipeline.core.images`, the data contract and its
parameters, the service and ``lesionflow predict``). Standard library only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: Formats accepted by default (PIL's names).
FORMATS: tuple[str, ...] = ("JPEG", "PNG")
#: File extensions of those formats (lower case; matched case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class SizeLimits:
    """The image sizes a model can judge: at least ``min_width`` x ``min_height`` pixels (in either
    orientation: a portrait image is turned before it is resized) and a longer side at most
    ``max_aspect_ratio`` times the shorter one. The defaults are the data contract's (``params.yaml``
    ``validate``); a trained model records the ones its training data met."""

    min_width: int = 64
    min_height: int = 64
    max_aspect_ratio: float = 4.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SizeLimits:
        """From a model config's ``input_limits`` (missing keys: the defaults)."""
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problem(self, width: int, height: int) -> str | None:
        """Why an image of ``width`` x ``height`` pixels is too small or too elongated, or None."""
        short_min, long_min = sorted((self.min_width, self.min_height))
        if min(width, height) < short_min or max(width, height) < long_min:
            return (
                f"image too small: {width}x{height} pixels; at least {self.min_width}x{self.min_height} "
                "are needed to judge a lesion"
            )
        ratio = max(width, height) / min(width, height)
        if ratio > self.max_aspect_ratio:
            return (
                f"image too elongated: {width}x{height} pixels (aspect ratio {ratio:.1f}:1); at most "
                f"{self.max_aspect_ratio:g}:1 is accepted"
            )
        return None
