"""An audit bundle as one zip that cannot be altered unnoticed: every file listed with its sha256 in
``manifest.json``, the manifest signed (``signature.json``, :mod:`pipeline.audit.signing`).

    write_bundle(Path("audit.zip"), files, summary, Path("keys/audit.key"))
    report = verify_bundle(Path("audit.zip"), Path("keys/audit.pub"))   # report["ok"], report["problems"]

:func:`verify_bundle` checks every hash, that no file was added or removed, the signature (against
the public key the auditor trusts, when given), and that the bundle agrees with itself: the model's
md5 in the manifest, in the weights, the lineage record, the model's schema, the gate verdict and
the model card. Its first problem names the file that differs.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.audit import annex, signing
from pipeline.core.errors import LesionflowError
from pipeline.core.fsutil import atomic_write_bytes

SCHEMA = "lesionflow-audit/1"
MANIFEST, SIGNATURE, INDEX_JSON, INDEX_MD = "manifest.json", "signature.json", "index.json", "index.md"


class BundleError(LesionflowError):
    """An output that exists already, or a file that is not an audit bundle."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(files: Mapping[str, bytes], summary: Mapping[str, Any]) -> bytes:
    """The manifest's bytes: schema, what the bundle is of, when, and every file's sha256 and size."""
    doc = {
        "schema": SCHEMA,
        **dict(summary),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {p: {"sha256": sha256(b), "bytes": len(b)} for p, b in sorted(files.items())},
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def write_bundle(out: Path, files: Mapping[str, bytes], summary: Mapping[str, Any], key: Path) -> dict[str, Any]:
    """Write the zip at ``out`` (refused if it exists): the files, the index, the manifest and its
    signature by ``key``. Returns the manifest's summary and the signing key's fingerprint."""
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out}: already exists; an audit bundle is never overwritten (choose --out)")
    idx = annex.index(list(files))
    everything = dict(files) | {
        INDEX_JSON: (json.dumps(idx, indent=2) + "\n").encode(),
        INDEX_MD: annex.markdown(idx).encode(),
    }
    man = manifest(everything, summary)
    sig = signing.sign(man, key)
    top = out.name.removesuffix(".zip")
    tmp = out.with_name(f".{out.name}.part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path, data in sorted(everything.items()):
            z.writestr(f"{top}/{path}", data)
        z.writestr(f"{top}/{MANIFEST}", man)
        z.writestr(f"{top}/{SIGNATURE}", json.dumps(sig, indent=2) + "\n")
    atomic_write_bytes(out, tmp.read_bytes())
    tmp.unlink()
    return {"path": str(out), "files": len(everything), "fingerprint": sig["fingerprint"]}


def read_bundle(path: Path) -> dict[str, bytes]:
    """``{path inside the bundle: bytes}`` of a bundle zip (its one top folder stripped)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) != 1 or any("/" not in n for n in names):
                raise BundleError(f"{path}: not an audit bundle (expected one top folder, found {sorted(tops)[:3]})")
            return {n.split("/", 1)[1]: z.read(n) for n in names}
    except FileNotFoundError:
        raise BundleError(f"{path}: no such file") from None
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{path}: not a zip file ({exc})") from None


def _hash_problems(files: Mapping[str, bytes], listed: Mapping[str, Any]) -> list[str]:
    problems = []
    for p, entry in sorted(listed.items()):
        if p not in files:
            problems.append(f"{p}: listed in the manifest but missing from the bundle")
        elif sha256(files[p]) != entry.get("sha256"):
            problems.append(f"{p}: sha256 {sha256(files[p])} differs from the manifest's {entry.get('sha256')}")
    extra = sorted(set(files) - set(listed) - {MANIFEST, SIGNATURE})
    problems += [f"{p}: in the bundle but not in the manifest" for p in extra]
    return problems


def _signature_problems(files: Mapping[str, bytes], trusted: bytes | None, where: str) -> tuple[list[str], str | None]:
    try:
        sig = json.loads(files[SIGNATURE])
        valid = signing.verify_signature(files[MANIFEST], sig["signature"], sig["public_key"].encode(), SIGNATURE)
    except (KeyError, ValueError, TypeError, signing.SigningError) as exc:
        return [f"{SIGNATURE}: unreadable ({exc})"], None
    fp = sig.get("fingerprint")
    if not valid:
        return [f"{MANIFEST}: the signature in {SIGNATURE} does not match it (altered after signing)"], fp
    if trusted is not None:
        want = signing.fingerprint(signing.load_public(trusted, where))
        if want != signing.fingerprint(signing.load_public(sig["public_key"].encode(), SIGNATURE)):
            return [f"{SIGNATURE}: signed by key {fp}, not by the trusted key {where} ({want})"], fp
    return [], fp


def _md5_problems(files: Mapping[str, bytes], man: Mapping[str, Any]) -> list[str]:
    want = man.get("model_md5")
    found: dict[str, Any] = {}
    if "model/model.pt" in files:
        found["model/model.pt"] = hashlib.md5(files["model/model.pt"]).hexdigest()
    for p in ("model/lesionflow.json", "model/metadata.json", "model/gates.json"):
        if p in files:
            found[p] = json.loads(files[p]).get("model_md5")
    problems = [f"{p}: model md5 {v} differs from the manifest's {want}" for p, v in found.items() if v != want]
    card = files.get("card/model_card.md")
    if card is not None and want and want.encode() not in card:
        problems.append(f"card/model_card.md: does not name the model md5 {want}")
    return problems


def verify_bundle(path: Path, public_key: Path | None = None) -> dict[str, Any]:
    """Check a bundle (module docstring). ``{"ok", "problems" (first: the first file that differs),
    "fingerprint", "tag", "model_md5", "files"}``."""
    files = read_bundle(Path(path))
    for needed in (MANIFEST, SIGNATURE):
        if needed not in files:
            raise BundleError(f"{path}: no {needed}; not a lesionflow audit bundle")
    try:
        man = json.loads(files[MANIFEST])
    except ValueError as exc:
        raise BundleError(f"{path}: {MANIFEST} is not JSON ({exc})") from None
    trusted = None
    if public_key is not None:
        try:
            trusted = Path(public_key).read_bytes()
        except OSError as exc:
            raise BundleError(f"{public_key}: cannot read the public key ({exc.strerror or exc})") from None
    problems = _hash_problems(files, man.get("files") or {})
    sig_problems, fp = _signature_problems(files, trusted, str(public_key))
    problems += sig_problems
    if not problems:
        problems += _md5_problems(files, man)
    return {
        "ok": not problems,
        "problems": problems,
        "fingerprint": fp,
        "trusted_key": str(public_key) if public_key else None,
        "tag": man.get("tag"),
        "model_md5": man.get("model_md5"),
        "files": len(man.get("files") or {}),
    }
