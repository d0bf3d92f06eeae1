"""``lesionflow history`` and ``lesionflow rollback``: champions over time, and making an earlier
one the champion again (:mod:`pipeline.registry.history`), with its Bento rebuilt."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from pipeline.cli.base import app, fail, out, root, safe, show


@app.command()
def history(as_json: bool = typer.Option(False, "--json", help="Print the history as JSON.")) -> None:
    """Champions over time: data version, git commit, key test metrics, and why each changed."""
    from pipeline.registry import history as champions

    rows = champions.history()
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    if not rows:
        out.print("No champion yet (no model has passed the gates)")
        return
    t = Table("when (UTC)", "champion", "how", "data md5", "git", *[k.split(".", 1)[1] for k in champions.KEY_METRICS],
              "reason", title="Champions over time (newest last)")  # fmt: skip
    for r in rows:
        t.add_row(
            r["at"],
            ("[bold]" if r["current"] else "") + r["tag"] + (" (current)[/]" if r["current"] else ""),
            safe(r["event"] + (f" by {r['by']}" if r.get("by") else "")),
            str(r["data_md5"]),
            str(r["git_commit"])[:12],
            *[show(r["metrics"][k], 3) for k in champions.KEY_METRICS],
            safe(r["reason"] or ""),
        )
    out.print(t)


@app.command()
def rollback(
    tag: str = typer.Argument(None, help="A packaged model or Bento tag (default: the champion before the current)."),
    reason: str = typer.Option(..., "--reason", help="Why: recorded in the history with who and when."),
    build: bool = typer.Option(True, help="Rebuild the Bento around the restored champion."),
) -> None:
    """Make a previously packaged model the champion again and rebuild its Bento."""
    from pipeline.registry import bento
    from pipeline.registry.history import rollback as roll_back
    from pipeline.registry.store import RegistryError

    base = root()
    try:
        event = roll_back(tag, reason)
    except RegistryError as exc:
        raise fail(str(exc)) from None
    out.print(
        f"Champion: [bold]{safe(event['tag'])}[/] again (was {safe(event['from'])}); recorded: "
        f"{safe(repr(event['reason']))} by {safe(event['by'])}"
    )
    if build:
        try:
            out.print(f"Bento: {bento.build_bento(base)}   (lesionflow serve)")
        except RegistryError as exc:
            raise fail(f"the rollback is recorded but the Bento build failed: {exc}") from None
