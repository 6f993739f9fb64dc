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


@data_app.command("convert")
@fail_cleanly
def convert(
    fmt: Annotated[str, typer.Argument(help="cc3m (or LAION-style TSV/CSV/parquet), webvid, audiocaps, nextgpt-t2m, "
                                            "mosit")],
    source: Annotated[Path, typer.Argument(help="the dataset's CSV/TSV/parquet/JSON file")],
    output: Annotated[Path, typer.Argument(help="JSONL manifest to write")],
    media_root: Annotated[Path | None, typer.Option(help="where the media files were downloaded to "
                                                         "(default: the source file's folder)")] = None,
) -> None:
    """Convert a dataset people already have (local files) into an anyverse pairs or dialogs manifest."""
    from anyverse.train.convert import convert as run

    typer.echo(run(fmt, source, output, media_root).summary())
