"""``lesionflow token add|list|revoke``: the API tokens clients send to the service
(:mod:`pipeline.serving.auth`). A token is shown once, when it is made; only its sha256 is kept, in
the project's ``.lesionflow/api-tokens`` (0600) or ``--file`` (for a Kubernetes Secret)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from pipeline.cli.base import app, err, fail, out, root
from pipeline.core.layout import Layout

token_app = typer.Typer(help="API tokens of the service: add, list, revoke.", no_args_is_help=True)
app.add_typer(token_app, name="token")

FILE_HELP = "Tokens file (default: $LESIONFLOW_API_TOKENS_FILE, else the project's .lesionflow/api-tokens)."


def tokens_file(given: Path | None) -> Path:
    import os

    from pipeline.serving import auth

    if given is not None:
        return given
    if os.environ.get(auth.TOKENS_ENV):
        return Path(os.environ[auth.TOKENS_ENV])
    return auth.project_tokens_file(Layout(root()).state_dir)


@token_app.command("add")
def add(
    name: str = typer.Argument(..., help="Who or what uses it (a person, a client system): letters, digits, . _ -"),
    file: Path | None = typer.Option(None, "--file", help=FILE_HELP),
) -> None:
    """Make a token for NAME; it is printed once (only its hash is kept)."""
    from pipeline.serving import auth

    path = tokens_file(file)
    try:
        token = auth.add(path, name)
    except auth.TokenError as exc:
        raise fail(str(exc)) from None
    err.print(f"Token {name!r} added to {path}. It is shown once; give it to {name} now:")
    out.print(token, soft_wrap=True)


@token_app.command("list")
def list_tokens(file: Path | None = typer.Option(None, "--file", help=FILE_HELP)) -> None:
    """The tokens' names and when they were made (never the tokens)."""
    from pipeline.serving import auth

    path = tokens_file(file)
    try:
        entries = auth.read_entries(path) if path.exists() else []
    except auth.TokenError as exc:
        raise fail(str(exc)) from None
    if not entries:
        out.print(f"No API tokens in {path} (lesionflow token add NAME)")
        return
    t = Table("name", "created (UTC)", "sha256 (first 12)", title=f"API tokens ({path})")
    for e in entries:
        t.add_row(e.name, e.created or "-", e.sha256[:12])
    out.print(t)


@token_app.command("revoke")
def revoke(
    name: str = typer.Argument(..., help="The token's name (lesionflow token list)."),
    file: Path | None = typer.Option(None, "--file", help=FILE_HELP),
) -> None:
    """Remove NAME's token: a running service refuses it within a second."""
    from pipeline.serving import auth

    path = tokens_file(file)
    try:
        auth.revoke(path, name)
    except auth.TokenError as exc:
        raise fail(str(exc)) from None
    out.print(f"Token {name!r} revoked ({path}).")
