"""flows/features.py: the features sharded over a Dask task runner equal the single-process ones."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd

from pipeline.features import imagestats
from tests.conftest import PROJECT_ROOT, project_env


def test_dask_sharded_features_equal_single_process(tiny_data, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    paths = sorted((tiny_data / "images").glob("*.jpg"))[:10]
    for p in paths:
        shutil.copyfile(p, images / p.name)
    out = tmp_path / "dask.parquet"
    # a fresh process with its own Prefect home: ephemeral Prefect server + local Dask cluster of
    # 2 workers (threads: starting worker processes that import Prefect costs ~30 s of CPU on this
    # 2-core machine; the sharding, serialisation and reassembly are the same); 4 shards of 3, 3, 3, 1
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.features",
            "--images",
            str(images),
            "--runner",
            "dask",
            "--workers",
            "2",
            "--dask-threads",
            "--shard-size",
            "3",
            "--out",
            str(out),
        ],
        cwd=PROJECT_ROOT,
        env=project_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on the dask runner" in proc.stdout
    sharded = pd.read_parquet(out)

    from pipeline.core.params import load_section

    config = load_section("eda", PROJECT_ROOT / "params.yaml").features
    single = pd.DataFrame([imagestats.features_for_file(images / p.name, config) for p in paths])
    assert list(sharded["image_id"]) == [p.stem for p in paths]
    assert list(sharded.columns) == list(single.columns)
    for col in single.columns:
        a, b = sharded[col].to_numpy(), single[col].to_numpy()
        if single[col].dtype.kind == "f":
            np.testing.assert_array_equal(a, b, err_msg=col)  # NaN == NaN here; bit-identical values
        else:
            assert list(a) == list(b), col
