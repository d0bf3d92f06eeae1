"""Label taxonomies: the one place that maps HAM10000's diagnoses to risk and binary classes.

Three levels of label are used throughout lesionflow:

* ``dx``: the 7 diagnoses of HAM10000 (akiec, bcc, bkl, df, mel, nv, vasc);
* ``risk``: 3 risk classes, by default benign = nv, bkl, df, vasc; benign_at_risk = akiec
  (actinic keratosis / intraepithelial carcinoma); malignant = mel, bcc;
* ``binary``: benign / malignant, by default malignant = mel, bcc, akiec.

The mappings come from ``params.yaml`` (section ``labels``) and are checked here: every diagnosis
is mapped exactly once at each level. Coarser probabilities are derived from diagnosis
probabilities by summing through the mapping (:meth:`Taxonomy.derive`), so they always sum to one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.core.errors import LesionflowError

#: HAM10000's diagnoses, in the canonical (alphabetical) order used for model outputs.
DIAGNOSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

#: Human-readable names of the diagnoses.
DIAGNOSIS_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

LEVELS: tuple[str, ...] = ("dx", "risk", "binary")


class TaxonomyError(LesionflowError, ValueError):
    """An invalid mapping; ``key`` names the params key (relative to the ``labels`` section)."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"labels.{key}: {message}")


def _check_mapping(level: str, diagnoses: Sequence[str], mapping: Mapping[str, Sequence[str]]) -> None:
    if not mapping:
        raise TaxonomyError(level, "mapping is empty")
    seen: dict[str, str] = {}
    for cls, members in mapping.items():
        if not members:
            raise TaxonomyError(f"{level}.{cls}", "class has no diagnoses")
        for dx in members:
            if dx not in diagnoses:
                raise TaxonomyError(f"{level}.{cls}", f"unknown diagnosis {dx!r} (known: {', '.join(diagnoses)})")
            if dx in seen:
                raise TaxonomyError(f"{level}.{cls}", f"diagnosis {dx!r} is mapped twice (also under {seen[dx]!r})")
            seen[dx] = cls
    missing = [dx for dx in diagnoses if dx not in seen]
    if missing:
        raise TaxonomyError(level, f"diagnoses not mapped to any class: {', '.join(missing)}")


@dataclass(frozen=True)
class Taxonomy:
    """The diagnoses and their mapping to the coarser levels ``risk`` and ``binary``."""

    diagnoses: tuple[str, ...]
    risk: dict[str, tuple[str, ...]]
    binary: dict[str, tuple[str, ...]]
    binary_positive: str = "malignant"
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {d: i for i, d in enumerate(self.diagnoses)})

    @classmethod
    def from_mapping(
        cls,
        diagnoses: Iterable[str],
        risk: Mapping[str, Iterable[str]],
        binary: Mapping[str, Iterable[str]],
        binary_positive: str = "malignant",
    ) -> Taxonomy:
        dx = tuple(diagnoses)
        if len(set(dx)) != len(dx):
            dup = sorted({d for d in dx if dx.count(d) > 1})
            raise TaxonomyError("diagnoses", f"listed more than once: {', '.join(dup)}")
        if len(dx) < 2:
            raise TaxonomyError("diagnoses", "at least two diagnoses are needed")
        risk_t = {k: tuple(v) for k, v in risk.items()}
        binary_t = {k: tuple(v) for k, v in binary.items()}
        _check_mapping("risk", dx, risk_t)
        _check_mapping("binary", dx, binary_t)
        if len(binary_t) != 2:
            raise TaxonomyError("binary", f"needs exactly two classes, got {list(binary_t)}")
        if binary_positive not in binary_t:
            raise TaxonomyError("binary_positive", f"{binary_positive!r} is not a binary class ({list(binary_t)})")
        return cls(dx, risk_t, binary_t, binary_positive)

    @classmethod
    def default(cls) -> Taxonomy:
        """The HAM10000 default described in the module docstring."""
        return cls.from_mapping(
            DIAGNOSES,
            {"benign": ["nv", "bkl", "df", "vasc"], "benign_at_risk": ["akiec"], "malignant": ["mel", "bcc"]},
            {"benign": ["nv", "bkl", "df", "vasc"], "malignant": ["mel", "bcc", "akiec"]},
        )

    # -- serialisation (travels in the model's JSON config) ------------------------------------
    def to_dict(self) -> dict:
        return {
            "diagnoses": list(self.diagnoses),
            "risk": {k: list(v) for k, v in self.risk.items()},
            "binary": {k: list(v) for k, v in self.binary.items()},
            "binary_positive": self.binary_positive,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Taxonomy:
        return cls.from_mapping(
            data["diagnoses"], data["risk"], data["binary"], data.get("binary_positive", "malignant")
        )

    # -- classes and mappings -------------------------------------------------------------------
    def classes(self, level: str) -> tuple[str, ...]:
        """The class names of a level, in output order."""
        if level == "dx":
            return self.diagnoses
        if level == "risk":
            return tuple(self.risk)
        if level == "binary":
            return tuple(self.binary)
        raise ValueError(f"unknown label level {level!r} (known: {', '.join(LEVELS)})")

    def mapping(self, level: str) -> dict[str, str]:
        """diagnosis -> class of ``level``."""
        if level == "dx":
            return {d: d for d in self.diagnoses}
        groups = self.risk if level == "risk" else self.binary if level == "binary" else None
        if groups is None:
            raise ValueError(f"unknown label level {level!r} (known: {', '.join(LEVELS)})")
        return {dx: cls for cls, members in groups.items() for dx in members}

    def matrix(self, level: str) -> np.ndarray:
        """(n_diagnoses, n_classes) 0/1 matrix M with M[d, c] = 1 when diagnosis d maps to c."""
        classes = self.classes(level)
        col = {c: j for j, c in enumerate(classes)}
        m = np.zeros((len(self.diagnoses), len(classes)), dtype=np.float64)
        for dx, cls in self.mapping(level).items():
            m[self._index[dx], col[cls]] = 1.0
        return m

    def derive(self, dx_probs: np.ndarray, level: str) -> np.ndarray:
        """Probabilities of ``level``'s classes from (n, 7) diagnosis probabilities, by summation."""
        p = np.asarray(dx_probs, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(self.diagnoses):
            raise ValueError(f"expected (n, {len(self.diagnoses)}) diagnosis probabilities, got {p.shape}")
        return p @ self.matrix(level)

    def labels(self, dx: Iterable[str], level: str) -> list[str]:
        """Map diagnosis labels to ``level``'s class names; unknown diagnoses raise with the value."""
        mapping = self.mapping(level)
        out = []
        for i, d in enumerate(dx):
            if d not in mapping:
                raise ValueError(f"row {i}: unknown diagnosis {d!r} (known: {', '.join(self.diagnoses)})")
            out.append(mapping[d])
        return out

    def encode(self, dx: Iterable[str], level: str = "dx") -> np.ndarray:
        """Integer class indices of ``level`` for diagnosis labels."""
        col = {c: j for j, c in enumerate(self.classes(level))}
        return np.array([col[c] for c in self.labels(dx, level)], dtype=np.int64)

    @property
    def positive_index(self) -> int:
        """Column of the positive (malignant) class in the binary level."""
        return self.classes("binary").index(self.binary_positive)
