"""params.yaml is read strictly; the label taxonomy maps every diagnosis exactly once."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from pipeline.core import params, taxonomy
from tests.conftest import PROJECT_ROOT


def write_params(tmp_path, mutate) -> str:
    data = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_project_params_load():
    loaded = params.load_all(PROJECT_ROOT / "params.yaml")
    assert {"labels", "validate", "split"} <= set(loaded)
    assert loaded["split"].train_fraction == pytest.approx(0.70)


@pytest.mark.parametrize(
    "mutate, key, message",
    [
        (lambda d: d["split"].update(val_fraction=1.5), "split.val_fraction", "must be in (0, 1)"),
        (lambda d: d["split"].update(seed="forty-two"), "split.seed", "expected an integer"),
        (lambda d: d["split"].update(sede=1), "split.sede", "unknown key"),
        (lambda d: d["validate"].update(min_width=True), "validate.min_width", "expected an integer"),
        (
            lambda d: d["validate"].update(image_id_pattern="ISIC_(["),
            "validate.image_id_pattern",
            "not a valid regular expression",
        ),
        (lambda d: d["labels"].pop("risk"), "labels.risk", "missing required key"),
    ],
)
def test_bad_params_fail_with_key_and_value(tmp_path, mutate, key, message):
    path = write_params(tmp_path, mutate)
    section = key.split(".")[0]
    with pytest.raises(params.ParamsError) as err:
        params.load_section(section, path)
    assert key in str(err.value) and message in str(err.value)
    assert str(path) in str(err.value), "the message names the file"


def test_unknown_section_is_an_error(tmp_path):
    path = write_params(tmp_path, lambda d: d.update(trian={"epochs": 3}))
    with pytest.raises(params.ParamsError, match="trian: unknown section"):
        params.load_all(path)


def test_default_taxonomy_maps_every_diagnosis_exactly_once():
    tax = params.load_taxonomy(PROJECT_ROOT / "params.yaml")
    assert tax.diagnoses == taxonomy.DIAGNOSES
    for level in ("risk", "binary"):
        m = tax.matrix(level)
        assert (m.sum(axis=1) == 1).all(), f"{level}: each diagnosis in exactly one class"
    assert tax.mapping("risk") == {
        "nv": "benign",
        "bkl": "benign",
        "df": "benign",
        "vasc": "benign",
        "akiec": "benign_at_risk",
        "mel": "malignant",
        "bcc": "malignant",
    }
    assert tax.mapping("binary") == {
        "nv": "benign",
        "bkl": "benign",
        "df": "benign",
        "vasc": "benign",
        "akiec": "malignant",
        "mel": "malignant",
        "bcc": "malignant",
    }
    assert tax == taxonomy.Taxonomy.default()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["labels"]["risk"]["benign"].append("mel"), "'mel' is mapped twice"),
        (lambda d: d["labels"]["binary"]["benign"].remove("vasc"), "not mapped to any class: vasc"),
        (lambda d: d["labels"]["risk"]["malignant"].append("scc"), "unknown diagnosis 'scc'"),
        (lambda d: d["labels"].update(binary_positive="cancer"), "'cancer' is not a binary class"),
        (
            lambda d: d["labels"]["binary"].update(other=["vasc"]) or d["labels"]["binary"]["benign"].remove("vasc"),
            "exactly two classes",
        ),
    ],
)
def test_bad_mapping_fails_loudly(tmp_path, mutate, message):
    path = write_params(tmp_path, mutate)
    with pytest.raises(params.ParamsError, match="labels") as err:
        params.load_section("labels", path)
    assert message in str(err.value)


def test_derived_probabilities_sum_to_one_and_follow_the_mapping():
    tax = taxonomy.Taxonomy.default()
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=50)
    for level in ("risk", "binary"):
        q = tax.derive(p, level)
        np.testing.assert_allclose(q.sum(axis=1), 1.0)
    q = tax.derive(p, "binary")
    malignant = [tax.diagnoses.index(d) for d in ("mel", "bcc", "akiec")]
    np.testing.assert_allclose(q[:, tax.positive_index], p[:, malignant].sum(axis=1))


def test_taxonomy_round_trips_through_json():
    tax = taxonomy.Taxonomy.default()
    assert taxonomy.Taxonomy.from_dict(tax.to_dict()) == tax
    assert tax.encode(["mel", "nv", "akiec"], "risk").tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="row 1: unknown diagnosis 'xyz'"):
        tax.labels(["mel", "xyz"], "binary")
