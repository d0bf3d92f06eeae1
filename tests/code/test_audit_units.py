"""The audit bundle's parts on their own: Ed25519 signing, the reproduction verdict, the Annex IV
index and the sites addendum (the whole export, verify and reproduce: tests/e2e/test_audit.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.audit import annex, changeplan, reproduce, signing


def test_a_signature_holds_for_the_signed_bytes_only_and_names_its_key(tmp_path):
    private, public = signing.keygen(tmp_path / "k")
    sig = signing.sign(b"manifest", private)
    pem = public.read_bytes()
    assert sig["public_key"].encode() == pem and sig["algorithm"] == "Ed25519"
    assert signing.verify_signature(b"manifest", sig["signature"], pem)
    assert not signing.verify_signature(b"manifest!", sig["signature"], pem)
    assert not signing.verify_signature(b"manifest", "bm90IGEgc2lnbmF0dXJl", pem)
    other_private, other_public = signing.keygen(tmp_path / "other")
    assert not signing.verify_signature(b"manifest", sig["signature"], other_public.read_bytes())
    assert (
        sig["fingerprint"]
        == signing.fingerprint(signing.load_public(pem))
        != signing.sign(b"x", other_private)["fingerprint"]
    )


def test_a_key_of_another_kind_or_no_key_at_all_is_named(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.key"
    path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(signing.SigningError, match=r"ec\.key: an .*PrivateKey, not an Ed25519 key"):
        signing.sign(b"x", path)
    with pytest.raises(signing.SigningError, match=r"missing\.key: cannot read the signing key"):
        signing.sign(b"x", tmp_path / "missing.key")
    with pytest.raises(signing.SigningError, match="not a PEM public key"):
        signing.load_public(b"garbage", "their.pub")


RECORD = {
    "model_md5": "a" * 32,
    "gates": {
        "gates": [
            {"metric": "binary.roc_auc", "value": 0.89},
            {"metric": "dx.ece", "value": 0.04},
            {"metric": "binary.roc_auc", "value": 0.89, "gate": "no_regression"},
        ]
    },  # fmt: skip
    "confidence": {"binary": {"roc_auc": {"low": 0.86, "high": 0.92}}},
}


@pytest.mark.parametrize(
    ("md5", "auc", "verdict"),
    [("a" * 32, 0.89, "identical"), ("b" * 32, 0.87, "within intervals"), ("b" * 32, 0.85, "differs")],
)
def test_reproduction_is_identical_within_the_intervals_or_different(md5, auc, verdict):
    got = reproduce.compare(RECORD, {"binary": {"roc_auc": auc}, "dx": {"ece": 0.5}}, md5)
    assert got["verdict"] == verdict
    rows = {r["metric"]: r for r in got["metrics"]}
    assert rows["binary.roc_auc"]["inside"] is (auc >= 0.86) and rows["dx.ece"]["inside"] is None  # no interval
    assert len(rows) == len(got["metrics"])  # a metric both gates name is one row


def test_without_any_interval_different_weights_are_not_called_reproduced():
    record = {**RECORD, "confidence": {}}
    assert reproduce.compare(record, {"binary": {"roc_auc": 0.89}}, "b" * 32)["verdict"] == "differs"


def test_every_file_an_export_writes_is_in_the_index_under_its_longest_prefix():
    paths = [
        "model/model.pt",
        "card/sites.md",
        "card/model_card.md",
        "lineage/change_control.md",
        "lineage/params.yaml",
    ]
    idx = annex.index(paths)
    assert set(idx["items"]) == set(paths)
    assert idx["items"]["card/sites.md"]["what"].startswith("the model card's addendum")
    assert "lineage/change_control.md" in idx["annex_iv"]["2(f)"]["items"]
    assert annex.entry("elsewhere.txt") is None
    assert "not covered by this bundle" in annex.markdown(idx)  # e.g. Article 9's risk management


def test_the_sites_addendum_says_why_a_site_is_not_suitable():
    site = {
        "name": "clinic-y",
        "created_at": "2026-12-07",
        "n_images": 80,
        "n_malignant": 30,
        "threshold": 0.01,
        "threshold_interval": [0.005, 0.02],
        "sensitivity": 0.95,
        "sensitivity_interval": [0.85, 1.0],
        "specificity": 0.1,
        "specificity_interval": [0.05, 0.2],
        "suitable": False,
        "reason": "specificity 0.100 below 0.30",
    }
    text = changeplan.sites_markdown([site], 0.07)
    assert "| clinic-y |" in text and "**no**: specificity 0.100 below 0.30" in text and "[0.005, 0.020]" in text
    assert "No site has been recorded" in changeplan.sites_markdown([], 0.07)


def test_one_byte_changed_in_any_file_of_a_bundle_fails_verification_naming_that_file(tmp_path):
    """Every file, the manifest and the signature included: verify names the file whose byte changed."""
    import hashlib
    import json
    import zipfile

    from pipeline.audit import seal

    key, pub = signing.keygen(tmp_path / "k")
    weights = b"\x00weights" * 64
    md5 = hashlib.md5(weights).hexdigest()
    files = {
        "model/model.pt": weights,
        "model/lesionflow.json": json.dumps({"model_md5": md5}).encode(),
        "card/model_card.md": f"# Model card\n\nmodel md5 {md5}\n".encode(),
        "data/datasheet.md": b"# Datasheet\n\n10,015 images\n",
    }
    bundle = seal.write_bundle(tmp_path / "b.zip", files, {"tag": "t:1", "model_md5": md5}, key)
    assert seal.verify_bundle(Path(bundle["path"]), pub)["ok"]
    with zipfile.ZipFile(bundle["path"]) as z:
        members = {n: z.read(n) for n in z.namelist()}
    for k, (name, data) in enumerate(members.items()):
        rel = name.split("/", 1)[1]
        i = len(data) // 2
        changed = dict(members) | {name: data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]}
        out = tmp_path / f"c{k}.zip"
        with zipfile.ZipFile(out, "w") as z:
            for n, d in changed.items():
                z.writestr(n, d)
        try:
            first = seal.verify_bundle(out, pub)["problems"][0]
        except seal.BundleError as exc:  # a manifest that is no longer JSON
            first = str(exc)
        assert rel in first, (rel, first)


def test_the_log_schema_names_every_record_kind_the_log_holds_and_no_patient_data():
    """The bundle's inference-log schema comes from the record builders: answer, features, tally and
    a clinician's dispute, field by field with their types, and no values."""
    from pipeline.audit import logschema

    s = logschema.schema()
    assert {"answer", "features", "tally", "dispute"} <= set(s)
    assert s["dispute"] == {"schema": "integer", "kind": "string", "timestamp": "string", "request_id": "string",
                            "dx": "string", "note": "string"}  # fmt: skip
    assert "image_b64" not in json.dumps(s) and "female" not in json.dumps(s)
