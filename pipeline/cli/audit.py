"""``lesionflow audit keygen | export | verify | reproduce``: the evidence for one model in one signed
file, its check, and the model rebuilt from its recorded commit, data version and params
(:mod:`pipeline.audit.evidence`, :mod:`pipeline.audit.seal`, :mod:`pipeline.audit.reproduce`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline.cli.base import app, fail, out, resolve_model, root, safe
from pipeline.core.errors import EXIT_FAILED, LesionflowError
from pipeline.core.layout import Layout

audit_app = typer.Typer(
    help="Audit a model: export its signed evidence, verify an export, reproduce the model.", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")

TAG_HELP = "A model tag (lesionflow-classifier:VERSION) or a Bento tag; default: the champion."


def _tag(tag: str | None) -> str:
    m = resolve_model(tag)
    if not m.packaged:
        raise fail(f"an audit is of a stored model (a registry tag), not the folder {m.path}")
    return m.label


def _log_counters() -> dict[str, Any] | None:
    """The inference log's location and every writer's persisted totals, when a log is configured."""
    from pipeline.monitoring import logstore
    from pipeline.serving.logmetrics import persisted

    location = logstore.location(root())
    return None if location is None else {"location": str(location), "writers": persisted(str(location))}


@audit_app.command("keygen")
def keygen(
    stem: Path = typer.Argument(..., help="Key files to write: STEM.key (private, 0600) and STEM.pub."),
) -> None:
    """Make an Ed25519 key pair for signing audit bundles. Keep STEM.key to yourself; publish STEM.pub
    (or its fingerprint) to those who verify."""
    from pipeline.audit import signing

    try:
        private, public = signing.keygen(stem)
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    fp = signing.fingerprint(signing.load_public(public.read_bytes()))
    out.print(f"private key: {safe(private)}  (keep it; never share it)")
    out.print(f"public key:  {safe(public)}")
    out.print(f"fingerprint: {fp}")


@audit_app.command("export")
def export(
    tag: str | None = typer.Argument(None, help=TAG_HELP),
    key: Path = typer.Option(
        ..., "--key", "-k", help="The private key signing the manifest (lesionflow audit keygen)."
    ),
    out_file: Path | None = typer.Option(
        None, "--out", help="The zip to write (default: reports/audit/audit-VERSION.zip)."
    ),
    sbom: bool = typer.Option(True, help="Include a CycloneDX SBOM of this environment (about 20 s)."),
) -> None:
    """Export the model's evidence (card, datasheet, lineage, SBOM, gates, validations, sites, drift
    checks, champion history, log schema and counters, an Annex IV index) as one signed zip."""
    from pipeline.audit import evidence, seal, signing

    if not key.is_file():
        raise fail(f"{key}: no such private key (make one: lesionflow audit keygen STEM)")
    model_tag = _tag(tag)
    target = out_file or Layout(root()).reports("audit") / f"audit-{model_tag.split(':')[-1]}.zip"
    if target.exists():
        raise fail(f"{target}: already exists; an audit bundle is never overwritten (choose --out)")
    try:
        signing.private_key(key)  # a bad key is refused before any work
        out.print(f"gathering the evidence of {safe(model_tag)} ...")
        files, summary = evidence.gather(model_tag, root(), _log_counters, with_sbom=sbom)
        target.parent.mkdir(parents=True, exist_ok=True)
        done = seal.write_bundle(target, files, summary, key)
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    out.print(f"wrote {safe(done['path'])}: {done['files']} files, manifest signed by key {done['fingerprint']}")
    for note in summary["notes"]:
        out.print(f"  not included: {safe(note)}")


@audit_app.command("verify")
def verify(
    bundle_file: Path = typer.Argument(..., help="An audit bundle (zip) written by lesionflow audit export."),
    public_key: Path | None = typer.Option(
        None, "--key", "-k", help="The signer's public key you trust (else: the fingerprint is shown to compare)."
    ),
) -> None:
    """Check every file's hash, the signature and that the bundle agrees with itself (model md5 in
    the manifest, weights, lineage, schema, gates and card); exit 1 naming the first difference."""
    from pipeline.audit import seal

    try:
        r = seal.verify_bundle(bundle_file, public_key)
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    if not r["ok"]:
        out.print(f"[bold red]FAILED[/] {safe(bundle_file)}: {safe(r['problems'][0])}")
        for p in r["problems"][1:]:
            out.print(f"  also: {safe(p)}")
        raise typer.Exit(EXIT_FAILED)
    who = f"the trusted key {safe(public_key)}" if public_key else "a key with this fingerprint (compare it)"
    out.print(
        f"[bold green]verified[/] {safe(bundle_file)}: {r['files']} files, model {safe(r['tag'])} md5 {r['model_md5']}"
    )
    out.print(f"  signed by {who}: {r['fingerprint']}")


@audit_app.command("reproduce")
def reproduce(
    tag: str | None = typer.Argument(None, help=TAG_HELP),
    keep: bool = typer.Option(False, help="Keep the temporary clone (its path is in the report)."),
) -> None:
    """Rebuild the model in a temporary clone at its recorded commit, data version and params, and
    compare: identical weights, or every gated test metric within its interval (exit 1 otherwise)."""
    from pipeline.audit import reproduce as rep

    model_tag = _tag(tag)
    try:
        r = rep.reproduce(model_tag, root(), keep=keep, echo=lambda line: out.print(safe(line)))
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    out.print(
        f"[bold]{r['verdict']}[/]: model md5 recorded {r['recorded_model_md5']}, reproduced {r['reproduced_model_md5']}"
    )
    out.print(f"report: {safe(r['report_dir'])}/report.md")
    if r["verdict"] == "differs":
        raise typer.Exit(EXIT_FAILED)
