"""``anyverse data``: make and convert datasets (thin; the work is in anyverse.train)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from anyverse.cli.errors import fail_cleanly

data_app = typer.Typer(help="Make synthetic datasets and convert existing ones to anyverse manifests.",
                       no_args_is_help=True)


@data_app.command("toyworld")
@fail_cleanly
def toyworld(
    directory: Annotated[Path, typer.Argument(help="new or empty directory (an earlier toy world is replaced)")],
    n: Annotated[int, typer.Option("--n", help="items per modality (images, sounds and videos each)")] = 200,
    seed: Annotated[int, typer.Option(help="the same n and seed always give the same files")] = 0,
) -> None:
    """Write the synthetic toy world: shapes, sounds, moving shapes, captions, dialogs, a held-out split."""
    from anyverse.train.toyworld import make_toyworld

    summary = make_toyworld(directory, n=n, seed=seed)
    typer.echo(f"toy world (n={n}, seed={seed}) in {summary.directory}")
    for split, per_modality in summary.counts["pairs"].items():
        typer.echo(f"  pairs {split}: " + ", ".join(f"{count} {m}" for m, count in per_modality.items()))
    for split, per_intent in summary.counts["dialogs"].items():
        typer.echo(f"  dialogs {split}: {sum(per_intent.values())} ("
                   + ", ".join(f"{count} {intent}" for intent, count in per_intent.items()) + ")")
