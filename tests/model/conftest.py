"""Servers for the service tests (tests/service_fixtures.py), one per test module that uses them.

* ``server``: an untrained fusion model (metadata used), no calibration and no OOD detector;
* ``trusted_server``: an untrained image-only model with what the train stage fits after
  training (temperature, OOD detector), here fitted on 80 real HAM10000 images; non-dermoscopic
  photographs fall far outside them; and the retrieval index of those 80 images (similar cases).
  It requires an API token, as on a hospital network: :func:`token_for` its URL
  (``trusted_client`` sends it).
"""

from __future__ import annotations

import httpx
import pandas as pd
import pytest

from pipeline.core import images, lineage, params
from pipeline.model import retrieval
from pipeline.model.inference import load_model
from pipeline.serving import auth
from tests.registry_fixtures import PROJECT_ROOT, write_model_dir
from tests.service_fixtures import TOKENS, serving, token_for

#: The real images the trusted model's OOD detector was fitted on (they pass its check).
TRUST_IMAGES = 80
#: Sites recorded with the trusted model (lesionflow site add measures them; here their outcome).
SITES = [
    {"name": "clinic-a", "threshold": 0.999, "target_sensitivity": 0.95, "suitable": True, "reason": None},
    {
        "name": "clinic-b",
        "threshold": 0.01,
        "target_sensitivity": 0.95,
        "suitable": False,
        "reason": "specificity 0.100 at sensitivity 0.950 is below serving.min_site_specificity 0.30",
    },
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, packaged tag, model dir) of a running service of an untrained fusion model."""
    tmp = tmp_path_factory.mktemp("service")
    model_dir = write_model_dir(tmp / "model", backbone="small_cnn", input_size=(48, 64), metadata_fusion=True)
    with serving(model_dir, tmp) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=30) as c:
        yield c


def trust_sample() -> pd.DataFrame:
    """The rows of the images the trusted model's calibration and OOD detector are fitted on."""
    meta = pd.read_csv(PROJECT_ROOT / "data" / "HAM10000_metadata.csv")
    return meta.sample(TRUST_IMAGES, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def trusted_server(tmp_path_factory):
    """(base URL, packaged tag, model dir) of a running service of a model with a temperature and
    an OOD detector, a retrieval index, and an inference log that keeps the images."""
    tmp = tmp_path_factory.mktemp("trusted")
    rows = trust_sample()
    imgs = [images.decode_rgb(PROJECT_ROOT / "data" / "images" / f"{i}.jpg") for i in rows["image_id"]]
    model_dir = write_model_dir(tmp / "model", trust_images=imgs, trust_labels=list(rows["dx"]))
    files = [PROJECT_ROOT / "data" / "images" / f"{i}.jpg" for i in rows["image_id"]]
    meta = {"model_md5": lineage.file_md5(model_dir / "model.pt")}
    p = params.load_section("retrieval", PROJECT_ROOT / "params.yaml")
    retrieval.build_index(load_model(model_dir, device="cpu"), rows, files, tmp / "retrieval", p, meta, False)
    token = auth.add(tmp / "api-tokens", "tests")
    env = {"LESIONFLOW_LOG_IMAGES": "1", "LESIONFLOW_AUTH": "", auth.TOKENS_ENV: str(tmp / "api-tokens")}
    with serving(model_dir, tmp, tmp / "retrieval", env_extra=env, site_records=SITES) as running:
        TOKENS[running[0]] = token
        yield running


@pytest.fixture(scope="module")
def trusted_client(trusted_server):
    headers = {"Authorization": f"Bearer {token_for(trusted_server[0])}"}
    with httpx.Client(base_url=trusted_server[0], timeout=30, headers=headers) as c:
        yield c
