"""``anyverse logs``: read and prune the conversation log that chat and run write."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from anyverse.cli.errors import fail_cleanly

logs_app = typer.Typer(help="Read the conversation log (chat and run write it; --no-log turns it off).",
                       invoke_without_command=True)
AsJson = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


def _log():  # type: ignore[no-untyped-def]
    from anyverse.config import anyverse_home
    from anyverse.logs import ConversationLog

    return ConversationLog(anyverse_home() / "logs.db")


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


@logs_app.callback()
def logs(ctx: typer.Context) -> None:
    """Without a subcommand: the conversations, newest first."""
    if ctx.invoked_subcommand is None:
        list_conversations(as_json=False, limit=20)


@logs_app.command("list")
@fail_cleanly
def list_conversations(as_json: AsJson = False,
                       limit: Annotated[int, typer.Option("-n", help="at most this many, newest first")] = 20) -> None:
    """The conversations: id, last change, profile, exchanges, and the first message."""
    log = _log()
    found = log.conversations(limit)
    if as_json:
        typer.echo(json.dumps([c.summary() for c in found]))
        return
    for conversation in found:
        history = log.history(conversation.id)
        first = history[0].text.replace("\n", " ")[:60] if history else ""
        typer.echo(f"{conversation.id}  {_when(conversation.updated)}  {conversation.profile:<9} "
                   f"{conversation.exchanges:>3} exchanges  {first}")


@logs_app.command("show")
@fail_cleanly
def show(cid: Annotated[str, typer.Argument(help="conversation id (see `anyverse logs list`)")],
         as_json: AsJson = False) -> None:
    """One conversation: every exchange with its media, requests and timings."""
    log = _log()
    conversation = log.get(cid)
    exchanges = log.exchanges(cid)
    if as_json:
        typer.echo(json.dumps({**conversation.summary(), "exchanges": exchanges}))
        return
    typer.echo(f"# {conversation.id} · profile {conversation.profile} · config {conversation.config_fingerprint}")
    for exchange in exchanges:
        for message in (exchange["user"], exchange["assistant"]):
            media = "".join(f"\n    [{m['id']}] {m['modality']}: {m['path']}" for m in message["media"])
            typer.echo(f"{message['role']}: {message['text']}{media}")


@logs_app.command("rm")
@fail_cleanly
def remove(cid: Annotated[str, typer.Argument(help="conversation id")]) -> None:
    """Delete a conversation from the log (its media files stay where they are)."""
    _log().remove(cid)
    typer.echo(f"removed {cid}")
