"""Retrieval units on synthetic embeddings: a query finds itself first, never two images of one
lesion, k respected, the same cases as scikit-learn's NearestNeighbors; the index round-trips
through plain files and refuses another model's; the kNN vote."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from pipeline.model import retrieval
from pipeline.model.retrieval import RetrievalError, RetrievalIndex

DX = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _index(n: int = 300, d: int = 16, seed: int = 0) -> tuple[RetrievalIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    lesions = [f"HAM_{i // 3:07d}" for i in range(n)]  # three images per lesion
    emb[1::3] = emb[0::3][: len(emb[1::3])] + 0.05 * rng.normal(size=(len(emb[1::3]), d))  # look-alike siblings
    cases = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(n)],
            "lesion_id": lesions,
            "dx": [DX[i % 7] for i in range(n)],
            "dx_type": ["histo"] * n,
            "thumb_offset": np.arange(n) * 2,
            "thumb_size": [2] * n,
        }
    )
    return RetrievalIndex(emb, cases, b"ab" * n, {"format": retrieval.FORMAT, "k": 6}), emb


def test_a_training_image_finds_itself_first_and_no_lesion_twice():
    index, emb = _index()
    for i in (0, 1, 42, 299):
        cases = index.query(emb[i], 6)[0]
        assert cases[0].image_id == f"ISIC_{i:07d}" and cases[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert len(cases) == 6 and len({c.lesion_id for c in cases}) == 6
        assert all(a.similarity >= b.similarity for a, b in zip(cases, cases[1:]))


def test_k_is_respected_even_when_few_lesions_exist():
    index, emb = _index(n=12)  # 4 lesions
    assert [len(r) for r in index.query(emb[:3], 2)] == [2, 2, 2]
    assert len(index.query(emb[0], 10)[0]) == 4  # every lesion once, no more


def test_results_equal_scikit_learns_nearest_neighbours_with_one_image_per_lesion():
    index, emb = _index(seed=3)
    queries = np.random.default_rng(9).normal(size=(25, emb.shape[1]))
    nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(emb)
    _, idx = nn.kneighbors(queries, n_neighbors=len(emb))
    for q, order in zip(index.query(queries, 6), idx):
        expected, seen = [], set()
        for i in order:
            lesion = index.cases["lesion_id"][i]
            if lesion not in seen:
                seen.add(lesion)
                expected.append(index.cases["image_id"][i])
            if len(expected) == 6:
                break
        assert [c.image_id for c in q] == expected


def test_knn_vote_weights_by_similarity():
    cases = [
        retrieval.Case("a", "l1", "mel", "histo", 0.9, None, None, None),
        retrieval.Case("b", "l2", "nv", "histo", 0.3, None, None, None),
        retrieval.Case("c", "l3", "nv", "histo", 0.3, None, None, None),
    ]
    vote = retrieval.knn_vote([cases], DX)[0]
    assert vote.sum() == pytest.approx(1.0) and vote[DX.index("mel")] == pytest.approx(0.6, abs=1e-4)


class _FakePredictor:
    """Embeddings from the mean colour of each image (what build_index asks a predictor for)."""

    def predict(self, rgbs, metadata=None, tta=None, batch_size=64):
        return {"embeddings": np.array([rgb.reshape(-1, 3).mean(0) for rgb in rgbs], dtype=np.float32) + 1.0}


def test_index_round_trips_through_plain_files_and_refuses_another_models(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(10):
        f = tmp_path / f"ISIC_{i:07d}.png"
        Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(f)
        files.append(f)
    frame = pd.DataFrame(
        {
            "image_id": [f.stem for f in files],
            "lesion_id": [f"HAM_{i // 2}" for i in range(10)],
            "dx": ["nv"] * 10,
            "dx_type": ["follow_up"] * 10,
            "age": [50.0] * 9 + [None],
            "sex": ["female"] * 10,
            "localization": ["back"] * 10,
        }
    )
    p = SimpleNamespace(batch_size=4, thumbnail_size=[75, 100], thumbnail_quality=80, k=3)
    info = retrieval.build_index(_FakePredictor(), frame, files, tmp_path / "index", p, {"model_md5": "abc"}, False)
    assert info["n"] == 10 and info["lesions"] == 5 and info["model_md5"] == "abc"
    index = RetrievalIndex.load(tmp_path / "index", model_md5="abc")
    assert np.load(tmp_path / "index" / retrieval.EMBEDDINGS_FILE, allow_pickle=False).dtype == np.float16
    thumb = Image.open(io.BytesIO(index.thumbnail("ISIC_0000003")))
    assert thumb.format == "JPEG" and thumb.size == (100, 75)
    assert index.thumbnail("ISIC_9999999") is None
    case = index.query(_FakePredictor().predict([np.asarray(Image.open(files[3]))])["embeddings"], 3)[0][0]
    assert (
        case.image_id in ("ISIC_0000003", "ISIC_0000002") and case.to_dict()["confirmation"] == "follow-up examination"
    )
    with pytest.raises(RetrievalError, match="built for model md5 abc"):
        RetrievalIndex.load(tmp_path / "index", model_md5="other")
    with pytest.raises(RetrievalError, match="cases.json: retrieval index file missing"):
        (tmp_path / "index" / retrieval.CASES_FILE).unlink()
        RetrievalIndex.load(tmp_path / "index")
