"""The configuration of the per-image statistics (``eda.features`` in params.yaml): what
:mod:`pipeline.features` computes and the EDA table, the reference profile and the service's
inference log record, so that all of them compute the same statistics. Checked strictly like every
parameter (:func:`pipeline.core.strict.fail` names the key)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.core.strict import fail

#: The six dermoscopic colours of the ABCD rule, in the order of the feature columns.
ABCD_COLOURS: tuple[str, ...] = ("white", "red", "light_brown", "dark_brown", "blue_grey", "black")


@dataclasses.dataclass(frozen=True)
class ColourRules:
    """Thresholds of the ABCD colour detector, in CIELAB after colour constancy.

    A lesion pixel (L*, a*, b*, chroma C = sqrt(a*^2 + b*^2)) takes the first colour whose rule
    holds, in this order, or none:

    1. black:        L* < black_max_l
    2. white:        L* >= white_min_l and C < white_max_chroma
    3. blue-grey:    b* <= blue_max_b and a* < blue_max_a and L* < blue_max_l (bluish, not purple)
    4. red:          a* >= red_min_a and a* >= red_hue_ratio * b* (red to purple hues)
    5. dark brown:   L* < dark_brown_max_l and C >= brown_min_chroma and a* > 0
    6. light brown:  L* < light_brown_max_l and C >= brown_min_chroma and a* > 0 and b* > 0

    Pixels matching none (skin-like, grey, green, ...) count towards no colour.
    """

    black_max_l: float = 22.0
    white_min_l: float = 78.0
    white_max_chroma: float = 12.0
    blue_max_b: float = -4.0
    blue_max_a: float = 12.0
    blue_max_l: float = 65.0
    red_min_a: float = 25.0
    red_hue_ratio: float = 2.0
    dark_brown_max_l: float = 40.0
    light_brown_max_l: float = 68.0
    brown_min_chroma: float = 8.0


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Knobs of the per-image statistics (:func:`pipeline.features.imagestats.image_features`):
    ``eda.features`` in params.yaml; stored with the EDA table and the reference profile, so that
    monitoring and the service compute exactly the statistics the reference holds.

    Statistics use every ``pixel_stride``-th pixel (in both directions) of the working copy (longer
    side ``working_max_side``): a regular, unbiased sample - 7,500 of the 30,000 pixels of a 200x150
    image at the default stride 2 - that keeps means, spreads and percentiles while cutting the
    cost 4x (``pixel_stride: 1`` uses every pixel). The segmentation runs on its L* plane
    block-averaged to a longer side of at most ``segment_max_side`` (so ``hair_kernel`` and
    ``smooth_sigma`` are in those pixels) and the mask is upsampled back for the colour statistics.
    Dark ``vignette_max_l`` corners grown by ``vignette_margin`` are outside the field of view; a
    lesion must cover ``min_area_fraction``..``max_area_fraction`` of the image and be
    ``min_contrast`` L* units darker than the skin. ABCD colours: shades-of-grey white balance with
    Minkowski norm ``colour_constancy_p`` (0 = off), :class:`ColourRules`, present above
    ``colour_min_share`` of the lesion; a ``palette_k``-colour k-means palette of at most
    ``palette_samples`` pixels and ``palette_iters`` iterations.
    """

    working_max_side: int = 200
    pixel_stride: int = 2
    segment_max_side: int = 100
    hair_kernel: int = 3
    smooth_sigma: float = 1.0
    vignette_max_l: float = 25.0
    vignette_margin: int = 3
    min_area_fraction: float = 0.005
    max_area_fraction: float = 0.90
    min_contrast: float = 6.0
    colour_constancy_p: float = 6.0
    colour_rules: ColourRules = dataclasses.field(default_factory=ColourRules)
    colour_min_share: float = 0.05
    palette_k: int = 3
    palette_samples: int = 256
    palette_iters: int = 8

    def __post_init__(self) -> None:
        for name, low in (
            ("working_max_side", 16),
            ("segment_max_side", 16),
            ("pixel_stride", 1),
            ("hair_kernel", 1),
            ("palette_k", 1),
            ("palette_iters", 1),
        ):
            if getattr(self, name) < low:
                fail(name, f"must be at least {low}, got {getattr(self, name)}")
        if not 0 <= self.min_area_fraction < self.max_area_fraction <= 1:
            fail(
                "max_area_fraction",
                f"need 0 <= min_area_fraction < max_area_fraction <= 1, got "
                f"{self.min_area_fraction} and {self.max_area_fraction}",
            )
        if self.palette_samples < self.palette_k:
            fail("palette_samples", f"must be at least palette_k ({self.palette_k}), got {self.palette_samples}")
        if self.colour_constancy_p < 0:
            fail("colour_constancy_p", f"must be >= 0 (0 = off), got {self.colour_constancy_p}")
        if not 0.0 < self.colour_min_share <= 1.0:
            fail("colour_min_share", f"must be in (0, 1], got {self.colour_min_share}")

    @property
    def colour_names(self) -> tuple[str, ...]:
        return ABCD_COLOURS


def feature_config_from_dict(d: Any) -> FeatureConfig:
    """The feature configuration recorded in a profile or a lineage (unknown keys of a newer
    version are ignored)."""
    from pipeline.core.strict import from_dict

    known = {f.name for f in dataclasses.fields(FeatureConfig)}
    return from_dict(FeatureConfig, {k: v for k, v in dict(d or {}).items() if k in known}, "feature_config")
