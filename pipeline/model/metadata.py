"""The metadata encoder: (age, sex, localization) as the fixed-length vector a fusion model reads.

The vocabularies come from the ``metadata`` section of params.yaml (:meth:`MetadataEncoder.from_params`)
and travel with the model (its config.json), so a served model encodes exactly as it was trained.
NumPy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.metadata import FIELDS
from pipeline.core.params import MetadataParams


@dataclass(frozen=True)
class MetadataEncoder:
    """Encode (age, sex, localization) as a fixed-length float vector; missing values allowed.

    Layout: ``[age / age_scale, age_missing, one-hot sex..., one-hot localization...]``. A missing
    or non-positive age (HAM10000 uses 0 and blank for unknown) gives 0 plus the missing flag;
    ``unknown``, blank or unseen sex/localization values give an all-zero one-hot block.
    """

    sexes: tuple[str, ...]
    localizations: tuple[str, ...]
    age_scale: float = 100.0
    columns: tuple[str, ...] = field(default=FIELDS, init=False)

    @classmethod
    def from_params(cls, p: MetadataParams) -> MetadataEncoder:
        """The encoder of the ``metadata`` vocabularies (the "unknown" value encodes as missing)."""
        return cls(tuple(p.known("sexes")), tuple(p.known("localizations")))

    @property
    def dim(self) -> int:
        """Length of the encoded vector."""
        return 2 + len(self.sexes) + len(self.localizations)

    def to_dict(self) -> dict[str, Any]:
        """The JSON stored in the model's architecture."""
        return {"sexes": list(self.sexes), "localizations": list(self.localizations), "age_scale": self.age_scale}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetadataEncoder:
        """Inverse of :meth:`to_dict`."""
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
