"""The ``retrieval`` stage on a tiny real sample with an ImageNet EfficientNet-Lite0, and the
evaluation's kNN evidence against an independent scikit-learn NearestNeighbors computation on the
same embeddings; ``lesionflow similar`` prints the cases and writes a contact sheet."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import NearestNeighbors

from pipeline.core import images, lineage
from pipeline.core.taxonomy import Taxonomy
from pipeline.evaluation.predictions import predict_split
from pipeline.evaluation.retrieval import knn_evidence
from pipeline.model.inference import load_model
from pipeline.model.retrieval import RetrievalIndex
from pipeline.stages import retrieval as stage
from tests.model import monitoring_fixtures as mf
from tests.registry_fixtures import PROJECT_ROOT

TAX = Taxonomy.default()
K = 4


@pytest.fixture(scope="module")
def built(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    meta = pd.read_csv(tiny_data / "HAM10000_metadata.csv")
    lesions = meta.drop_duplicates("lesion_id")["lesion_id"]
    test_lesions = set(lesions.iloc[::4])
    splits = root / "splits"
    splits.mkdir()
    meta[~meta["lesion_id"].isin(test_lesions)].to_csv(splits / "train.csv", index=False)
    meta[meta["lesion_id"].isin(test_lesions)].to_csv(splits / "test.csv", index=False)
    model = mf.tiny_model_dir(root / "model", TAX)
    argv = ["--model", str(model), "--splits", str(splits), "--images", str(tiny_data / "images")]
    assert stage.main([*argv, "--out", str(root / "index"), "--no-progress"]) == 0
    return {"root": root, "model": model, "splits": splits, "images": tiny_data / "images"}


def test_the_stage_indexes_every_training_image_for_its_model(built):
    index = RetrievalIndex.load(built["root"] / "index", model_md5=lineage.file_md5(built["model"] / "model.pt"))
    train = pd.read_csv(built["splits"] / "train.csv")
    assert len(index) == len(train) and set(index.cases["image_id"]) == set(train["image_id"])
    assert index.meta["lineage"]["data"]["md5"] and index.meta["k"] == 6
    # a training image finds its own lesion first, similarity ~1, no lesion twice
    p = load_model(built["model"], device="cpu")
    for image_id in train["image_id"].iloc[:5]:
        emb = p.predict([images.decode_rgb(built["images"] / f"{image_id}.jpg")], tta=False)["embeddings"]
        cases = index.query(emb, K)[0]
        assert cases[0].image_id == image_id and cases[0].similarity == pytest.approx(1.0, abs=2e-3)
        assert len(cases) == K and len({c.lesion_id for c in cases}) == K


def test_knn_evidence_equals_an_independent_sklearn_computation(built):
    index = RetrievalIndex.load(built["root"] / "index")
    test = pd.read_csv(built["splits"] / "test.csv")
    pred = predict_split(load_model(built["model"], device="cpu"), test, built["images"], 16, "test", False)
    ev = knn_evidence(index, pred, TAX, K)
    # scikit-learn: cosine neighbours of the same (normalised) embeddings, one per lesion, weighted vote
    nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(index.vectors)
    dist, order = nn.kneighbors(pred.embeddings, n_neighbors=len(index))
    classes = list(TAX.classes("dx"))
    votes, agree = [], []
    for d_row, o_row, truth in zip(dist, order, test["dx"]):
        seen, picked = set(), []
        for d, i in zip(d_row, o_row):
            lesion = index.cases["lesion_id"][i]
            if lesion not in seen:
                seen.add(lesion)
                picked.append((index.cases["dx"][i], 1.0 - d))
            if len(picked) == K:
                break
        v = np.zeros(len(classes))
        for dx, sim in picked:
            v[classes.index(dx)] += max(sim, 0.0) + 1e-6
        votes.append(v)
        agree.append(np.mean([dx == truth for dx, _ in picked]))
    y = TAX.encode(test["dx"])
    assert ev["knn"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, np.argmax(votes, 1)))
    assert ev["precision_at_k"] == pytest.approx(np.mean(agree))
    assert ev["softmax"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred.level("dx").argmax(1)))


def test_cli_prints_the_cases_and_writes_a_contact_sheet(built, tmp_path):
    image_id = pd.read_csv(built["splits"] / "train.csv")["image_id"].iloc[0]
    # an unpackaged model folder: its index is the one beside it (artifacts/retrieval in a project)
    model = tmp_path / "artifacts" / "model"
    model.parent.mkdir()
    import shutil

    shutil.copytree(built["model"], model)
    (model / "operating_point.json").write_text('{"threshold": 0.3}')
    shutil.copytree(built["root"] / "index", model / "retrieval")
    sheet = tmp_path / "cases.png"
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "similar", str(built["images"] / f"{image_id}.jpg")]
        + ["--model", str(model), "--k", "3", "--sheet", str(sheet)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert image_id in run.stdout and "HAM10000" in run.stdout and "similarity" in run.stdout
    with Image.open(sheet) as im:
        assert im.width >= 4 * 150 and im.format == "PNG"
