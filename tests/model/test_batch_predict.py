"""Batch inference sharded over a local Dask cluster of two worker processes (flows/predict.py,
``lesionflow predict --dask-workers``) gives the rows of a single process, in input order, and
reports the same unreadable files."""

from __future__ import annotations

import numpy as np
import pandas as pd

from flows.predict import predict_on_dask
from pipeline.core.taxonomy import Taxonomy
from pipeline.model import batchpredict
from pipeline.model.inference import load_model
from tests.model import monitoring_fixtures as mf
from tests.service_fixtures import real_images


def test_dask_shards_give_the_single_process_rows(tmp_path):
    model = mf.tiny_model_dir(tmp_path / "model", Taxonomy.default())
    files = real_images(40)
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    files = files[:17] + [bad] + files[17:]
    one, one_problems = batchpredict.predict_files(load_model(model, device="cpu"), files, 0.3, 8, progress=False)
    many, many_problems = predict_on_dask(model, files, 0.3, batch_size=8, workers=2, shard_size=10)
    assert list(many["file"]) == list(one["file"]) and len(one) == 40
    assert one_problems == many_problems == [(str(bad), "not an image (unrecognised file format)")]
    numeric = [c for c in one.columns if c.startswith("p_") or c == "ood_score"]
    assert np.allclose(many[numeric].to_numpy(float), one[numeric].to_numpy(float), atol=1e-5)
    pd.testing.assert_series_equal(many["decision"], one["decision"])
