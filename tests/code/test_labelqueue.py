"""The labelling queue's order (pipeline.evaluation.labelqueue) and the label-review decisions file
(pipeline.data.decisions): what a person labelling images and an auditor rely on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.data import decisions
from pipeline.evaluation import labelqueue as lq

PRED = {"binary_probabilities": {"benign": 0.9, "malignant": 0.1}}
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _probs(top: list[float]) -> np.ndarray:
    """Rows whose largest probability is ``top``, the rest spread evenly."""
    rows = []
    for t in top:
        rest = (1 - t) / 6
        rows.append([t] + [rest] * 6)
    return np.asarray(rows)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_uncertainty_is_one_for_a_uniform_answer_and_zero_for_a_certain_one():
    p = np.array([[1 / 7] * 7, [1.0] + [0.0] * 6, [0.5, 0.5] + [0.0] * 5])
    for kind in ("entropy", "margin"):
        u = lq.uncertainty(p, kind)
        assert u[0] == pytest.approx(1.0) and u[1] == pytest.approx(0.0)
    assert lq.uncertainty(p, "margin")[2] == pytest.approx(1.0)  # a tie between two classes
    # risk: half the entropy, half how close p(malignant) is to the operating threshold
    risk = lq.uncertainty(p, "risk", p_malignant=np.array([0.2, 0.0, 0.6]), threshold=0.2)
    assert risk == pytest.approx([1.0, 0.0, 0.5 * lq.uncertainty(p, "entropy")[2] + 0.5 * 0.5])
    with pytest.raises(ValueError, match="needs p\\(malignant\\)"):
        lq.uncertainty(p, "risk")
    with pytest.raises(ValueError, match="expected one of entropy, margin"):
        lq.uncertainty(p, "variance")


def test_with_equal_novelty_the_more_uncertain_image_comes_first():
    rng = np.random.default_rng(0)
    known = _unit(rng.normal(size=(20, 8)))
    emb = _unit(rng.normal(size=(4, 8)))
    emb = np.repeat(emb[:1], 4, axis=0) + 1e-3 * rng.normal(size=(4, 8))  # one place, four images
    q = lq.rank(_probs([0.9, 0.3, 0.6, 0.15]), emb, known, 4, novelty_weight=0.0)
    assert q["row"].tolist() == [3, 1, 2, 0]
    assert q["reason"].eq(lq.INFORMATIVE).all() and q["uncertainty"].is_monotonic_decreasing


def test_with_equal_uncertainty_the_image_farthest_from_the_known_ones_comes_first():
    known = np.eye(8)[:4]
    emb = _unit(np.array([[1, 0.1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0.2]], float))
    q = lq.rank(_probs([0.5, 0.5, 0.5]), emb, known, 3, novelty_weight=1.0)
    assert q["row"].tolist()[0] == 1  # orthogonal to everything known
    assert q.loc[0, "novelty"] == pytest.approx(1.0)
    assert q["row"].tolist()[-1] == 0  # nearly a known image


def test_a_pick_pushes_its_near_duplicates_down_the_queue():
    known = np.eye(8)[:2]
    far = np.eye(8)[5]
    dupes = np.stack([far, far + 1e-3, far + 2e-3])
    other = np.eye(8)[6] * 0.7 + np.eye(8)[0] * 0.3
    emb = _unit(np.vstack([dupes, other]))
    q = lq.rank(_probs([0.5, 0.5, 0.5, 0.55]), emb, known, 2, novelty_weight=2.0)
    assert q["row"].tolist()[0] in (0, 1, 2)
    assert q["row"].tolist()[1] == 3  # not a second copy of the first pick


def test_disputed_then_refused_come_first_and_the_budget_holds():
    rng = np.random.default_rng(1)
    emb = _unit(rng.normal(size=(6, 8)))
    refused = [False, True, False, False, True, False]
    disputed = [False, False, False, True, True, False]  # row 4 is both: listed once, as disputed
    q = lq.rank(_probs([0.2] * 6), emb, None, 4, refused=refused, disputed=disputed)
    assert q["row"].tolist()[:3] == [3, 4, 1]
    assert q["reason"].tolist()[:3] == [lq.DISPUTED, lq.DISPUTED, lq.REFUSED]
    assert len(q) == 4 and q["rank"].tolist() == [1, 2, 3, 4] and q["row"].is_unique


def test_a_random_share_is_interleaved_and_drawn_from_what_the_queue_left():
    rng = np.random.default_rng(2)
    emb = _unit(rng.normal(size=(40, 8)))
    probs = _probs(list(np.linspace(0.15, 0.95, 40)))
    q = lq.rank(probs, emb, None, 10, refused=[True] + [False] * 39, random_share=0.5, seed=3)
    assert q["reason"].tolist() == ["refused"] + ["informative", "random"] * 4 + ["informative"]
    assert q["row"].is_unique and len(q) == 10
    again = lq.rank(probs, emb, None, 10, refused=[True] + [False] * 39, random_share=0.5, seed=3)
    assert again["row"].tolist() == q["row"].tolist()  # the same seed, the same draw
    assert lq.interleave([1, 2, 3], ["a"]) == [1, "a", 2, 3] and lq.interleave([], ["a"]) == ["a"]


def _meta() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "lesion_id": ["L1", "L1", "L2", "L3"],
            "image_id": ["I1", "I2", "I3", "I4"],
            "dx": ["nv", "nv", "bkl", "mel"],
        }
    )


def test_a_correction_relabels_the_whole_lesion_and_the_last_decision_counts(tmp_path):
    path = tmp_path / "decisions.csv"
    decisions.record(path, "I1", "corrected", "nv", "mel", reviewer="dr a")
    decisions.record(path, "I3", "corrected", "bkl", "mel")
    decisions.record(path, "I3", "kept", "bkl", note="second look")
    decisions.record(path, "I9", "kept", "nv")
    out, summary = decisions.apply(_meta(), decisions.read(path, CLASSES))
    assert out["dx"].tolist() == ["mel", "mel", "bkl", "mel"]
    assert summary == {"decisions": 3, "corrected": 1, "kept": 2, "images_relabelled": 2, "not_in_data": ["I9"]}
    assert _meta()["dx"].tolist() == ["nv", "nv", "bkl", "mel"]  # the data table is not changed


def test_bad_decisions_are_refused_naming_the_row_or_the_images(tmp_path):
    path = tmp_path / "decisions.csv"
    decisions.record(path, "I1", "corrected", "nv", "mel")
    text = path.read_text().replace(",mel,", ",melanoma,")
    path.write_text(text)
    with pytest.raises(decisions.DecisionError, match=r"decisions.csv: row 2: dx 'melanoma'"):
        decisions.read(path, CLASSES)
    path.unlink()
    decisions.record(path, "I1", "corrected", "nv", "mel")
    decisions.record(path, "I2", "corrected", "nv", "bcc")
    with pytest.raises(decisions.DecisionError, match="I1 and I2 of lesion L1 are corrected to different"):
        decisions.apply(_meta(), decisions.read(path, CLASSES))
    with pytest.raises(decisions.DecisionError, match="needs a new diagnosis"):
        decisions.record(path, "I4", "corrected", "mel", "mel")
    assert decisions.read(tmp_path / "absent.csv", CLASSES).empty


def test_a_label_studio_export_gives_the_last_real_annotation_and_names_unlabelled_tasks(tmp_path):
    from pipeline.data import labelstudio
    from tests.label_fixtures import annotate

    tasks = [labelstudio.task("data:,", i, "informative", "nv", 0.8, "m:1", extra={"sex": "male"})
             for i in ("ISIC_0000001", "ISIC_0000002", "other")]  # fmt: skip
    truth = pd.DataFrame({"image_id": ["ISIC_0000001", "ISIC_0000002"], "dx": ["mel", "bkl"],
                          "dx_type": ["histo", "consensus"], "lesion_id": ["HAM_1", ""]})  # fmt: skip
    path = tmp_path / "export.json"
    path.write_text(__import__("json").dumps(annotate(tasks, truth)))
    rows, unlabelled = labelstudio.read_export(path)
    assert rows[["image_id", "dx", "dx_type", "lesion_id", "sex"]].values.tolist() == [
        ["ISIC_0000001", "mel", "histo", "HAM_1", "male"],
        ["ISIC_0000002", "bkl", "consensus", "", "male"],
    ]
    assert unlabelled == ["other"]
    path.write_text('[{"data": {"image": "x"}}]')
    with pytest.raises(labelstudio.ExportError, match=r"export.json: task 1 .*no data.image_id"):
        labelstudio.read_export(path)
    config = labelstudio.label_config(CLASSES, ["histo", "consensus"])
    assert config.count("<Choice ") == len(CLASSES) + 2 and 'required="true"' in config


def test_a_batch_numbers_foreign_ids_converts_png_and_starts_new_lesions(tmp_path):
    from PIL import Image

    from pipeline.data import labelimport

    src = tmp_path / "queue"
    src.mkdir()
    Image.new("RGB", (80, 60), (200, 120, 90)).save(src / "a1b2c3.png")
    Image.new("RGB", (80, 60), (90, 120, 200)).save(src / "ISIC_0000007.jpg")
    rows = pd.DataFrame({"image_id": ["a1b2c3", "ISIC_0000007"], "lesion_id": ["", "HAM_9"], "dx": ["mel", "nv"],
                         "dx_type": ["histo", "follow_up"], "age": [None, "45"], "sex": ["", "female"],
                         "localization": [None, "back"]})  # fmt: skip
    columns = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    with pytest.raises(labelimport.LabelImportError, match=r"1 image id\(s\) do not match .* \(a1b2c3\)"):
        labelimport.make_batch(rows, src, tmp_path / "b0", columns, r"^ISIC_\d{7}$")
    batch = labelimport.make_batch(rows, src, tmp_path / "b1", columns, r"^ISIC_\d{7}$", number_from=9000000)
    table = pd.read_csv(batch.metadata, dtype=str, keep_default_na=False)
    assert table.columns.tolist() == columns
    assert table.values.tolist() == [
        ["LF_ISIC_9000000", "ISIC_9000000", "mel", "histo", "", "unknown", "unknown"],
        ["HAM_9", "ISIC_0000007", "nv", "follow_up", "45.0", "female", "back"],
    ]
    assert batch.renamed.values.tolist() == [["a1b2c3", "ISIC_9000000"]]
    assert (batch.images / "ISIC_9000000.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert (batch.images / "ISIC_0000007.jpg").read_bytes() == (src / "ISIC_0000007.jpg").read_bytes()
    with pytest.raises(labelimport.LabelImportError, match="already exists"):
        labelimport.make_batch(rows, src, tmp_path / "b1", columns, r"^ISIC_\d{7}$", number_from=1)
    wrong = rows.assign(sha256=["", "0" * 64])
    with pytest.raises(labelimport.LabelImportError, match=r"ISIC_0000007: .* is not the image that was labelled"):
        labelimport.make_batch(wrong, src, tmp_path / "b3", columns, r"^ISIC_\d{7}$", number_from=1)
    assert not (tmp_path / "b3").exists()
    with pytest.raises(labelimport.LabelImportError, match=r"no image file gone\.\* in"):
        labelimport.make_batch(rows.assign(image_id=["gone", "ISIC_0000007"]), src, tmp_path / "b2", columns, ".*")


def test_a_dispute_joins_its_answer_in_the_log(tmp_path):
    from pipeline.monitoring import inferencelog
    from pipeline.monitoring.logrecord import dispute_record, make_record

    for rid in ("r1", "r2"):
        inferencelog.append(
            make_record(stats={}, metadata={}, prediction=PRED, model_tag="t", request_id=rid), tmp_path
        )
    inferencelog.append(dispute_record("r2", "bcc", note="first"), tmp_path)
    inferencelog.append(dispute_record("r2", "mel", note="on second look"), tmp_path)
    rows = inferencelog.read(tmp_path).set_index("request_id")
    assert rows.loc["r2", "disputed_dx"] == "mel" and rows.loc["r2", "dispute_note"] == "on second look"
    assert pd.isna(rows.loc["r1", "disputed_dx"]) and len(rows) == 2
