"""Similar confirmed cases: content-based retrieval with the classifier's own penultimate embeddings
(Tschandl et al., "Diagnostic accuracy of content-based dermatoscopic image retrieval with deep
classification features", Br J Dermatol 2019).

The **index** (built by the ``retrieval`` stage, packaged with the model) is plain files:

``embeddings.npy``   the L2-normalised penultimate embeddings of the training split, float16
``cases.json``       column by column: image_id, lesion_id, dx, dx_type, age, sex, localization, and
                     where each thumbnail is in ``thumbnails.bin`` (thumb_offset, thumb_size); plain
                     JSON, so that the service reads it without pandas
``thumbnails.bin``   small JPEG thumbnails, concatenated (so that a Bento is self-contained)
``index.json``       format, the model's md5 (an index is refused for another model), sizes, lineage

A **query** is exact cosine similarity (one matrix product: 7,000 x 1,280 takes a few
milliseconds), the best ``k`` cases with at most one image per lesion. At a million images an
approximate index would take over (FAISS ``IndexHNSWFlat`` or IVF-PQ on the same normalised
vectors: sub-linear search, a few hundred MB), with exact re-ranking of its candidates.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core import fsutil
from pipeline.core.errors import LesionflowError
from pipeline.model import bundle

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "lesionflow-retrieval/2"
EMBEDDINGS_FILE, CASES_FILE, THUMBS_FILE, INDEX_FILE = "embeddings.npy", "cases.json", "thumbnails.bin", "index.json"
#: The columns every index's cases have (``dx_type`` and the metadata fields are optional).
CASE_COLUMNS = ("image_id", "lesion_id", "dx", "thumb_offset", "thumb_size")
#: Credit for the training cases' images, wherever they are shown.
ATTRIBUTION = (
    "Training cases: HAM10000 (Tschandl, Rosendahl, Kittler, Sci. Data 5, 180161, 2018), licensed CC BY-NC-SA 4.0."
)
#: What each dx_type means, for people.
CONFIRMATION = {
    "histo": "histopathology",
    "follow_up": "follow-up examination",
    "consensus": "expert consensus",
    "confocal": "confocal microscopy",
}
#: Candidates examined per requested case before giving up on finding more distinct lesions.
_CANDIDATES = 8


class RetrievalError(LesionflowError, RuntimeError):
    """A retrieval index that cannot be used (missing, unreadable, or built for another model)."""


def index_model_md5(folder: Path | str) -> str | None:
    """The md5 of the model an index folder was built for (None when there is no index)."""
    return (fsutil.read_json(Path(folder) / INDEX_FILE) or {}).get("model_md5")


def normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32; a zero row stays zero)."""
    e = np.asarray(embeddings, dtype=np.float32)
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norm, 1e-12)


def thumbnail_jpeg(rgb: np.ndarray, size: tuple[int, int], quality: int) -> bytes:
    """A JPEG thumbnail of an (H, W, 3) uint8 image fitting in ``size`` (height, width), aspect kept."""
    from PIL import Image

    img = Image.fromarray(rgb)
    img.thumbnail((size[1], size[0]))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


@dataclass
class Case:
    """One retrieved training case."""

    image_id: str
    lesion_id: str
    dx: str
    dx_type: str
    similarity: float
    age: float | None
    sex: str | None
    localization: str | None

    def to_dict(self, demographics: bool = True) -> dict[str, Any]:
        """The case as JSON; without ``demographics`` its patient's age, sex and body site are null."""
        shown = demographics
        return {
            "image_id": self.image_id,
            "lesion_id": self.lesion_id,
            "dx": self.dx,
            "dx_type": self.dx_type,
            "confirmation": CONFIRMATION.get(self.dx_type, self.dx_type),
            "similarity": round(self.similarity, 4),
            "age": self.age if shown else None,
            "sex": self.sex if shown else None,
            "localization": self.localization if shown else None,
        }


class RetrievalIndex:
    """A loaded index (see the module docstring)."""

    def __init__(
        self, embeddings: np.ndarray, cases: Mapping[str, Sequence[Any]], thumbnails: bytes, meta: dict[str, Any]
    ):
        self.vectors = normalise(embeddings)  # float32 once, for fast products
        self.cases: dict[str, list[Any]] = {k: list(v) for k, v in cases.items()}  # column -> values
        self.thumbnails = thumbnails
        self.meta = meta
        lesions: dict[str, int] = {}
        self._lesion = np.array([lesions.setdefault(str(v), len(lesions)) for v in self.cases["lesion_id"]])
        self._row = {str(i): k for k, i in enumerate(self.cases["image_id"])}

    def __len__(self) -> int:
        return len(self.cases["image_id"])

    @classmethod
    def for_model(cls, model_dir: Path | str) -> RetrievalIndex:
        """The index packaged with a model (its ``retrieval/`` folder), checked to be this model's."""
        return cls.load(Path(model_dir) / bundle.RETRIEVAL_DIR, model_md5=bundle.model_md5(model_dir))

    @classmethod
    def load(cls, folder: Path | str, model_md5: str | None = None) -> RetrievalIndex:
        """Read an index (no pickle); refuse one built for another model than ``model_md5``."""
        d = Path(folder)
        for name in (EMBEDDINGS_FILE, CASES_FILE, THUMBS_FILE, INDEX_FILE):
            if not (d / name).exists():
                raise RetrievalError(f"{d / name}: retrieval index file missing (build it: dvc repro retrieval)")
        meta = fsutil.read_json(d / INDEX_FILE) or {}
        if meta.get("format") != FORMAT:
            raise RetrievalError(f"{d / INDEX_FILE}: format {meta.get('format')!r}, expected {FORMAT!r}")
        if model_md5 is not None and meta.get("model_md5") != model_md5:
            raise RetrievalError(
                f"{d / INDEX_FILE}: built for model md5 {meta.get('model_md5')}, not this model's {model_md5}: "
                "its embeddings are not comparable (rebuild it: dvc repro retrieval)"
            )
        emb = np.load(d / EMBEDDINGS_FILE, allow_pickle=False)
        cases = _read_cases(d / CASES_FILE)
        n = len(cases["image_id"])
        if len(emb) != n:
            raise RetrievalError(f"{d}: {len(emb)} embeddings but {n} cases")
        return cls(emb, cases, (d / THUMBS_FILE).read_bytes(), meta)

    def query(self, embeddings: np.ndarray, k: int) -> list[list[Case]]:
        """The ``k`` most similar cases of each query embedding (cosine), at most one per lesion."""
        q = normalise(np.atleast_2d(embeddings))
        sims = q @ self.vectors.T
        out: list[list[Case]] = []
        for row in sims:
            n = min(len(row), max(k * _CANDIDATES, k))
            order = np.argpartition(-row, n - 1)[:n] if n < len(row) else np.arange(len(row))
            order = order[np.argsort(-row[order], kind="stable")]
            picked = self._distinct(order, k)
            if len(picked) < k and n < len(row):  # many images of few lesions: look at everything
                picked = self._distinct(np.argsort(-row, kind="stable"), k)
            out.append([self._case(i, float(row[i])) for i in picked])
        return out

    def _distinct(self, order: np.ndarray, k: int) -> list[int]:
        seen: set[int] = set()
        picked: list[int] = []
        for i in order:
            lesion = int(self._lesion[i])
            if lesion not in seen:
                seen.add(lesion)
                picked.append(int(i))
                if len(picked) == k:
                    break
        return picked

    def value(self, column: str, i: int) -> Any:
        """Case ``i``'s ``column`` (None when the index has no such column or the value is missing)."""
        values = self.cases.get(column)
        v = None if values is None else values[i]
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    def _case(self, i: int, similarity: float) -> Case:
        age = self.value("age", i)
        return Case(
            str(self.value("image_id", i)),
            str(self.value("lesion_id", i)),
            str(self.value("dx", i)),
            str(self.value("dx_type", i) or ""),
            similarity,
            None if age is None else float(age),
            self.value("sex", i),
            self.value("localization", i),
        )

    def thumbnail(self, image_id: str) -> bytes | None:
        """The JPEG thumbnail of a training image of the index, or None."""
        k = self._row.get(str(image_id))
        if k is None:
            return None
        off, size = int(self.cases["thumb_offset"][k]), int(self.cases["thumb_size"][k])
        return self.thumbnails[off : off + size]


def embed(
    predictor: Any,
    frame: pd.DataFrame,
    files: Sequence[Path],
    batch_size: int,
    progress: bool = True,
    desc: str = "embeddings",
    each: Callable[[list[np.ndarray], dict[str, Any]], None] | None = None,
) -> np.ndarray:
    """The L2-normalised embeddings (float32) of every row of ``frame`` (its image in ``files``;
    its metadata when the model fuses it), of the plain view as a query is embedded; ``each`` sees
    every batch of decoded images and the predictor's outputs for them (the retrieval index makes
    its thumbnails from the images)."""
    from tqdm.auto import tqdm

    from pipeline.core import images
    from pipeline.core.metadata import FIELDS

    fields = [c for c in FIELDS if c in frame.columns]
    out = []
    with tqdm(total=len(frame), desc=desc, unit="img", disable=not progress) as bar:
        for s in range(0, len(frame), batch_size):
            rgbs = [images.decode_rgb(f, str(f)) for f in files[s : s + batch_size]]
            meta = frame.iloc[s : s + batch_size][fields].reset_index(drop=True)
            pred = predictor.predict(rgbs, metadata=meta, tta=False, batch_size=batch_size)
            out.append(pred["embeddings"])
            if each is not None:
                each(rgbs, pred)
            bar.update(len(rgbs))
    return normalise(np.concatenate(out)) if out else np.zeros((0, 0), dtype=np.float32)


def build_index(
    predictor: Any,
    frame: pd.DataFrame,
    files: list[Path],
    out_dir: Path,
    p: Any,
    meta: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every row of ``frame`` (its image in ``files``) with ``predictor`` (plain view, the
    query's view), make its thumbnail and write the index to ``out_dir`` whole or not at all.
    ``p``: the ``retrieval`` params; ``meta``: what ``index.json`` also records (model md5,
    lineage). Returns ``index.json``'s content."""
    from pipeline.core.metadata import FIELDS

    cols = [c for c in ("image_id", "lesion_id", "dx", "dx_type", *FIELDS) if c in frame.columns]
    rows = frame[cols].reset_index(drop=True)
    thumbs: list[bytes] = []

    def thumbnails(rgbs: list[np.ndarray], _: dict[str, Any]) -> None:
        thumbs.extend(thumbnail_jpeg(rgb, tuple(p.thumbnail_size), p.thumbnail_quality) for rgb in rgbs)

    vectors = embed(predictor, rows, files, p.batch_size, progress, "retrieval index", thumbnails)
    sizes = np.array([len(t) for t in thumbs], dtype=np.int64)
    rows["thumb_offset"] = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes
    rows["thumb_size"] = sizes
    vectors = vectors.astype(np.float16)
    info = {
        "format": FORMAT,
        "n": int(len(rows)),
        "dim": int(vectors.shape[1]),
        "lesions": int(rows["lesion_id"].nunique()),
        "thumbnail_size": list(p.thumbnail_size),
        "k": p.k,
        "bytes": {"embeddings": int(vectors.nbytes), "thumbnails": int(sizes.sum())},
        **meta,
    }
    with fsutil.staged_dir(out_dir) as stage:
        np.save(stage / EMBEDDINGS_FILE, vectors, allow_pickle=False)
        columns = {c: [None if _missing(v) else _plain(v) for v in rows[c]] for c in rows.columns}
        (stage / CASES_FILE).write_text(json.dumps(columns, allow_nan=False, separators=(",", ":")))
        (stage / THUMBS_FILE).write_bytes(b"".join(thumbs))
        fsutil.write_json(stage / INDEX_FILE, info)
    return info


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _read_cases(path: Path) -> dict[str, list[Any]]:
    """The columns of ``cases.json``, checked: the required ones present, all of one length."""
    try:
        cases = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RetrievalError(f"{path}: cannot be read as the index's cases ({exc})") from None
    if not isinstance(cases, dict) or not all(isinstance(v, list) for v in cases.values()):
        raise RetrievalError(f"{path}: expected an object of columns (lists)")
    missing = [c for c in CASE_COLUMNS if c not in cases]
    if missing:
        raise RetrievalError(f"{path}: missing column(s) {', '.join(missing)}")
    lengths = {len(v) for v in cases.values()}
    if len(lengths) > 1:
        raise RetrievalError(f"{path}: columns of different lengths {sorted(lengths)}")
    return cases


def knn_vote(neighbours: list[list[Case]], classes: list[str]) -> np.ndarray:
    """Class probabilities of a similarity-weighted vote of each query's neighbours (rows sum to 1)."""
    index = {c: j for j, c in enumerate(classes)}
    out = np.zeros((len(neighbours), len(classes)))
    for i, cases in enumerate(neighbours):
        for c in cases:
            out[i, index[c.dx]] += max(c.similarity, 0.0) + 1e-6
    return out / np.maximum(out.sum(1, keepdims=True), 1e-12)
